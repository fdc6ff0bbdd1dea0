"""LoRA adapters of a fused family (Phi-3) are written in the layout stock PEFT reads on the stock model,
and read back from it: the same update either way, and a round trip keeps the ranks."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import tiny_model, tokens
from transformers import AutoModelForCausalLM

from prunetune.families import family_of
from prunetune.families.adapters import load_peft, read_adapter_files, to_stock_layout
from prunetune.training.lora import LoraSettings, add_lora


def _randomise(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def _assert_same_logits(a, b):
    x = tokens()
    with torch.no_grad():
        assert (a(x).logits - b(x).logits).abs().max() <= 1e-5


def _stock(split_model, directory):
    """The split model's weights as the stock (fused) checkpoint a user has, loaded by transformers."""
    joined = copy.deepcopy(split_model)
    family_of(joined).join_fused(joined)
    joined.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("settings", [
    LoraSettings(r=4, alpha=8, dropout=0.0),
    LoraSettings(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "up_proj", "down_proj")),
], ids=["every-projection", "some-parts"])
def test_an_adapter_prunetune_writes_loads_in_stock_peft_on_stock_phi3(settings, tmp_path):
    base = tiny_model("phi3")
    adapted = _randomise(add_lora(copy.deepcopy(base), settings))
    adapted.save_pretrained(tmp_path / "adapter")
    to_stock_layout(tmp_path / "adapter", adapted)
    tensors, config = read_adapter_files(tmp_path / "adapter")
    assert not any(".qkv_proj.q_proj." in key or ".gate_up_proj.up_proj." in key for key in tensors)
    assert {"qkv_proj", "gate_up_proj"} <= set(config["target_modules"])
    served = PeftModel.from_pretrained(_stock(base, tmp_path / "stock"), str(tmp_path / "adapter")).eval()
    _assert_same_logits(served, adapted)


def test_unequal_scalings_and_rslora_survive_the_join(tmp_path):
    base = tiny_model("phi3")
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"],
                        rank_pattern={"k_proj": 2}, alpha_pattern={"gate_proj": 3})
    adapted = _randomise(get_peft_model(copy.deepcopy(base), config))
    adapted.save_pretrained(tmp_path / "adapter")
    to_stock_layout(tmp_path / "adapter", adapted)
    served = PeftModel.from_pretrained(_stock(base, tmp_path / "stock"), str(tmp_path / "adapter")).eval()
    _assert_same_logits(served, adapted)


def test_a_stock_peft_adapter_loads_on_prunetunes_split_model(tmp_path):
    """An adapter a user trained with stock PEFT on stock Phi-3 computes the same on the split model."""
    base = tiny_model("phi3")
    stock = _stock(base, tmp_path / "stock")
    trained = _randomise(get_peft_model(stock, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj",
                                                                                               "o_proj", "down_proj"])))
    trained.save_pretrained(tmp_path / "adapter")
    loaded = load_peft(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert any(".qkv_proj.q_proj." in name for name, _ in loaded.named_parameters())
    _assert_same_logits(loaded, trained)


def test_a_round_trip_keeps_each_projections_rank(tmp_path):
    base = tiny_model("phi3")
    adapted = _randomise(add_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8, dropout=0.0)))
    adapted.save_pretrained(tmp_path / "adapter")
    to_stock_layout(tmp_path / "adapter", adapted)
    reloaded = load_peft(copy.deepcopy(base), tmp_path / "adapter").eval()
    ranks = {name: p.shape[0] for name, p in reloaded.named_parameters() if name.endswith("lora_A.default.weight")}
    assert set(ranks.values()) == {4}
    assert reloaded.peft_config["default"].rank_pattern == {}
    _assert_same_logits(reloaded, adapted)


def test_families_without_fused_projections_keep_peft_s_layout(tmp_path):
    adapted = _randomise(add_lora(tiny_model("llama"), LoraSettings(r=4, alpha=8, dropout=0.0)))
    adapted.save_pretrained(tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    to_stock_layout(tmp_path / "adapter", adapted)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_loram_on_phi3_end_to_end_writes_adapters_stock_peft_loads(tmp_path):
    """prune -> train -> recover on a tiny Phi-3: the adapter trained on the pruned model loads in stock PEFT on
    the pruned checkpoint, the recovered one on the stock full model, and `prunetune eval --adapter` reads it."""
    from helpers import run_cli
    from tiny import save_tiny_model_dir

    from prunetune.methods.loram.pipeline import (LoramPruneSettings, StepOptions, prune_for_loram, recover,
                                                  train_adapter)
    from prunetune.runs.settings import RunOptions
    from prunetune.training.loop import TrainSettings

    full = save_tiny_model_dir(tmp_path / "full", "phi3")
    quiet = lambda _: None  # noqa: E731
    prune_for_loram(str(full), tmp_path / "pruned", LoramPruneSettings(ratio=0.4, seq_len=32, calib_samples=2),
                    RunOptions(progress=False), log=quiet)
    train_adapter(str(tmp_path / "pruned"), tmp_path / "adapter", TrainSettings(steps=2, batch_size=2, seq_len=32),
                  LoraSettings(dropout=0.0), StepOptions(progress=False), log=quiet)
    recover(tmp_path / "adapter", tmp_path / "pruned", str(full), tmp_path / "recovered", log=quiet)
    for adapter, model in (("adapter", "pruned"), ("recovered", "full")):
        tensors, config = read_adapter_files(tmp_path / adapter)
        assert any(".qkv_proj.lora_A." in key for key in tensors) and "qkv_proj" in config["target_modules"]
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / model), str(tmp_path / adapter))
    done = run_cli("eval", full, "--adapter", tmp_path / "recovered", "--data", "builtin:pydoc", "--max-windows", "1",
                   "--seq-len", "32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
