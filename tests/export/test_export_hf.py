"""Saved models load again and compute the same function: with stock transformers when every
layer has the same shape, with prunetune.load_model when they differ."""

import json

import pytest
import torch
from tiny import ARCHITECTURES, NoTokenizer, tiny_model, tokens, uniform_masks
from transformers import AutoModelForCausalLM

from prunetune.export.hf import save_model
from prunetune.structure.surgery import cut
from prunetune.structure.units import Structure, count_parameters

TOL = 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_uniform_prune_saves_a_stock_checkpoint(arch, tmp_path):
    model = tiny_model(arch)
    x = tokens()
    cut(model, uniform_masks(Structure.of(model), [True, False, True], 20))
    expected = model(x).logits
    _, saved_as = save_model(model, NoTokenizer(), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded(x).logits - expected).abs().max() <= TOL
    assert loaded.config.num_attention_heads == 4 and loaded.config.intermediate_size == 20
    assert saved_as == arch


def test_llama_with_heads_not_dividing_hidden_saves_as_mistral(tmp_path):
    """transformers 5 LlamaConfig refuses a head count that does not divide the hidden size."""
    model = tiny_model("llama")
    x = tokens()
    s = Structure.of(model)
    masks = uniform_masks(s, [True, False, True], 24)
    masks.hidden = torch.ones(s.hidden, dtype=torch.bool)
    masks.hidden[:6] = False  # hidden 90, 4 heads: 90 % 4 != 0
    cut(model, masks)
    expected = model(x).logits
    _, saved_as = save_model(model, NoTokenizer(), tmp_path)
    assert saved_as == "mistral"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["rope_parameters"]["rope_type"] == "llama3"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded(x).logits - expected).abs().max() <= TOL


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_nonuniform_prune_loads_with_prunetune(arch, tmp_path):
    model = tiny_model(arch)
    x = tokens()
    s = Structure.of(model)
    masks = uniform_masks(s, [True, False, True], 20)
    masks.heads[0] = torch.ones(6, dtype=torch.bool)  # layer 0 untouched: shapes now differ
    del masks.channels[3]
    masks.layers = torch.tensor([True, True, False, True])
    cut(model, masks)
    expected = model(x).logits
    save_model(model, NoTokenizer(), tmp_path)
    # Stock loading must fail loudly rather than build the wrong model.
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    from prunetune.layer_shapes import load_nonuniform
    from prunetune.models import load_config, resolve_model_spec

    loaded = load_nonuniform(str(tmp_path), load_config(resolve_model_spec(str(tmp_path))), torch.float32).eval()
    assert (loaded(x).logits - expected).abs().max() <= TOL
    assert count_parameters(loaded) == count_parameters(model)
    assert Structure.of(loaded).layers == Structure.of(model).layers
