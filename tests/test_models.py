"""Model specs, architectures, and the quantized frozen base."""

import pytest
import torch
from tiny import tokens
from transformers import GPT2Config, GPT2LMHeadModel

from prunetune import load_model
from prunetune.export.hf import save_model
from prunetune.errors import UserError
from prunetune.importance import magnitude_scores
from prunetune.models import is_quantized, resolve_model_spec
from prunetune.structure.allocate import select_masks
from prunetune.structure.masks import apply_masks
from prunetune.structure.surgery import cut
from prunetune.structure.units import Structure, count_parameters


def test_resolve_specs(tmp_path, model_dir):
    assert resolve_model_spec("smollm2-135m").kind == "gguf"
    assert resolve_model_spec(str(model_dir)).kind == "dir"
    assert resolve_model_spec("meta-llama/Llama-3.2-1B").kind == "hub"
    with pytest.raises(UserError, match="no such model"):
        resolve_model_spec("./missing/model")
    with pytest.raises(UserError, match="no such model"):
        resolve_model_spec(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve_model_spec(str(tmp_path / "empty"))


def test_local_directory_loads(model_dir):
    model, tokenizer = load_model(str(model_dir))
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tokenizer.pad_token is not None


def test_unsupported_architecture_is_one_line(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_is_one_line():
    with pytest.raises(UserError, match="cannot load 'someone/no-such-model'.*smollm2-135m"):
        load_model("someone/no-such-model")


def test_bad_options():
    with pytest.raises(UserError, match="quantization"):
        load_model("smollm2-135m", quant="4bit")


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_quantized_base_prunes_to_a_dense_model(quant, model_dir, tmp_path):
    dense, _ = load_model(str(model_dir))
    model, tokenizer = load_model(str(model_dir), quant=quant)
    assert is_quantized(model)
    # Quantized layers count by shape, not by packed storage.
    assert count_parameters(model) == count_parameters(dense)
    s = Structure.of(model)
    masks = select_masks(s, magnitude_scores(model), 0.5, list(range(s.num_layers)), round_to=8)
    x = tokens(vocab=100)
    with apply_masks(model, masks):
        masked = model(x).logits
    cut(model, masks)
    assert not is_quantized(model)
    # The cut model holds the de-quantized weights: close to the quantized forward, not equal.
    assert (model(x).logits - masked).abs().max() < 0.5
    cut(dense, masks)
    assert count_parameters(model) == count_parameters(dense)
    save_model(model, tokenizer, tmp_path / "out")
    reloaded, _ = load_model(str(tmp_path / "out"))
    assert "quantization_config" not in reloaded.config.to_dict()


def test_nonuniform_directory_loads_quantized(model_dir, tmp_path):
    model, tokenizer = load_model(str(model_dir))
    s = Structure.of(model)
    masks = select_masks(s, magnitude_scores(model), 0.5, [1, 2], round_to=8)
    cut(model, masks)
    save_model(model, tokenizer, tmp_path / "out")
    loaded, _ = load_model(str(tmp_path / "out"))
    x = tokens(vocab=100)
    assert (loaded(x).logits - model(x).logits).abs().max() <= 1e-4
    quantized, _ = load_model(str(tmp_path / "out"), quant="nf4")
    assert is_quantized(quantized) and Structure.of(quantized).layers == Structure.of(model).layers
    assert torch.isfinite(quantized(x).logits).all()
