"""`prune` end to end on a tiny model with the real tokenizer: every method, recovery, quantized bases."""

import json
import os

import pytest
from transformers import AutoModelForCausalLM

from prunetune import load_model
from prunetune.evaluate import perplexity
from prunetune.runs.settings import EvalSettings, RunOptions, checkpoint_dir_for
from prunetune.methods.prune import PruneSettings, prune
from prunetune.structure.units import count_parameters
from prunetune.training.loop import TrainSettings

EVAL = EvalSettings(data="builtin:pydoc", seq_len=32, max_windows=3)


def _options(steps=6, quant=None, **kw):
    return RunOptions(training=TrainSettings(steps=steps, batch_size=2, seq_len=32, lr=1e-3, **kw),
                      quant=quant, progress=False)


def _settings(method, **kw):
    return PruneSettings(method=method, ratio=0.5, round_to=8, **kw)


def test_loraprune_end_to_end(wide_model_dir, tmp_path):
    out = tmp_path / "lp"
    record = prune(str(wide_model_dir), out, _settings("loraprune"), EVAL,
                   _options(steps=10, checkpoint_every=5), log=lambda _: None)
    stored = json.loads((out / "prunetune.json").read_text())
    assert stored["method"] == "loraprune" and stored["settings"]["layers"] == [0, 1, 2]  # 'paper': last layer kept
    assert len(stored["training"]["history"]) == 10 and stored["training"]["schedule"][-1]["fraction"] == 1.0
    assert abs(stored["parameters"]["ratio_achieved"] - 0.5) < 0.05
    assert not checkpoint_dir_for(out).exists()  # the resumable checkpoint goes once the run is complete
    model, tokenizer = load_model(str(out))  # layers differ in shape: prunetune loads it
    assert count_parameters(model)["total"] == record["parameters"]["after"]["total"]
    again = perplexity(model, tokenizer, EVAL.data, EVAL.seq_len, max_windows=EVAL.max_windows, progress=False)
    assert again.perplexity == pytest.approx(stored["results"]["perplexity_after"]["perplexity"], rel=1e-4)
    assert "report.md" in os.listdir(out)


@pytest.mark.parametrize("method", ["magnitude", "taylor", "wanda-sp", "random", "lora-guided"])
def test_one_shot_methods_with_recovery_save_stock_checkpoints(method, wide_model_dir, tmp_path):
    out = tmp_path / method
    record = prune(str(wide_model_dir), out, _settings(method, recover_steps=3), EVAL, _options(), log=lambda _: None)
    assert len(record["training"]["history"]) == 3
    loaded = AutoModelForCausalLM.from_pretrained(out)  # every layer pruned alike: stock transformers
    assert count_parameters(loaded)["total"] == record["parameters"]["after"]["total"]
    assert not any("lora" in n for n, _ in loaded.named_parameters())


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_loraprune_on_a_quantized_base_saves_a_dense_model(quant, wide_model_dir, tmp_path):
    out = tmp_path / quant
    record = prune(str(wide_model_dir), out, _settings("loraprune"), EVAL, _options(steps=4, quant=quant),
                   log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model, _ = load_model(str(out))
    assert count_parameters(model)["total"] == record["parameters"]["after"]["total"]


def test_taylor_refuses_a_quantized_base(wide_model_dir, tmp_path):
    from prunetune.errors import UserError

    with pytest.raises(UserError, match="taylor"):
        prune(str(wide_model_dir), tmp_path / "t", _settings("taylor"), EVAL, _options(quant="8bit"),
              log=lambda _: None)
    assert not (tmp_path / "t").exists()


def test_killed_run_resumes_to_the_same_model(wide_model_dir, tmp_path, monkeypatch):
    """A run killed mid-way leaves only its checkpoint; the same command with --resume finishes it."""
    from prunetune.methods.loraprune.pruner import LoRAPruner

    options = dict(steps=8, checkpoint_every=3)
    whole = prune(str(wide_model_dir), tmp_path / "whole", _settings("loraprune"), EVAL, _options(**options),
                  log=lambda _: None)

    out = tmp_path / "killed"
    original = LoRAPruner.before_optimizer_step

    def crash_at_step_5(self, step):
        if step == 5:
            raise KeyboardInterrupt
        original(self, step)

    monkeypatch.setattr(LoRAPruner, "before_optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        prune(str(wide_model_dir), out, _settings("loraprune"), EVAL, _options(**options), log=lambda _: None)
    assert not out.exists() and checkpoint_dir_for(out).exists()
    monkeypatch.setattr(LoRAPruner, "before_optimizer_step", original)

    resumed_options = _options(**options)
    resumed_options.resume = True
    resumed = prune(str(wide_model_dir), out, _settings("loraprune"), EVAL, resumed_options, log=lambda _: None)
    assert resumed["training"]["resumed_from_step"] == 3
    assert resumed["kept"] == whole["kept"]
    assert resumed["results"]["perplexity_after"]["perplexity"] == pytest.approx(
        whole["results"]["perplexity_after"]["perplexity"], rel=1e-5)
    assert not checkpoint_dir_for(out).exists()
