"""Sheared-LLaMA end to end: shear to a target shape, continue training, resume, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_user_error, run_cli
from tiny import tiny_model

from prunetune.methods.sheared.domains import DomainSampler, parse_domains
from prunetune.methods.sheared.dynamic_loading import DynamicLoading
from prunetune.methods.sheared.shear import ShearHooks, ShearSettings
from prunetune.methods.sheared.l0_masks import ShearMasks
from prunetune.methods.sheared.target import parse_target
from prunetune.structure.units import Structure
from prunetune.training.loop import ComposedHooks, TrainSettings, train

TARGET = "layers=3,hidden=64,heads=4,kv-heads=2,intermediate=32"
DOMAINS = "code=builtin:stdlib-code,prose=builtin:pydoc"
SMALL = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-blocks", "2", "--max-windows", "2",
         "--eval-seq-len", "32"]


def test_shear_then_train_end_to_end(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sheared = tmp_path / "sheared"
    done = run_cli("shear", str(model_dir), "--target", TARGET, "--data", DOMAINS, "--dynamic-loading", "--steps",
                   "6", *SMALL, "--out", str(sheared), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((sheared / "prunetune.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(sheared)  # stock transformers loads the result
    structure = Structure.of(model)
    assert (structure.num_layers, structure.hidden) == (3, 64)
    assert {(s.num_heads, s.num_kv_heads, s.intermediate) for s in structure.layers} == {(4, 2, 32)}
    params = record["parameters"]
    assert params["after"]["total"] == params["target"] == sum(p.numel() for p in model.parameters())
    assert record["checks"]["masked_vs_cut_max_abs_logit_diff"] < 1e-4  # masked model == pruned model
    assert set(record["data"]["reference_losses"]) == {"code", "prose"}
    history = record["training"]["history"]
    assert all("domain_weights" in h and "masks" in h for h in history)
    assert ((sheared / "run" / "plots" / "masks.png").exists()
            and (sheared / "run" / "plots" / "domain_weights.png").exists())
    assert "## Domains" in (sheared / "report.md").read_text()
    # the defaults: masks start from Taylor scores, and the source model (a second copy) is the teacher
    assert record["settings"]["mask_init"] == "taylor" and record["settings"]["distill"]["enabled"]
    assert record["training"]["distill"]["held_as"] == "a second copy"

    trained = tmp_path / "trained"
    done = run_cli("train", str(sheared), "--data", DOMAINS, "--dynamic-loading", "--steps", "4", *SMALL,
                   "--export", "gguf:q8_0", "--out", str(trained), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    again = json.loads((trained / "prunetune.json").read_text())
    # the references come from the shear run: the source model's own per-domain losses
    assert again["data"]["reference_losses"] == record["data"]["reference_losses"]
    assert again["training"]["distill"]["teacher"] == str(model_dir)  # the source the shear run records
    assert Structure.of(AutoModelForCausalLM.from_pretrained(trained)).hidden == 64
    assert [(e["architecture"], e["outtype"]) for e in again["exports"]] == [("llama", "q8_0")]
    assert (trained / "model.gguf").is_file()


def test_shear_with_lora_cuts_the_merged_model(tiny_model_dir, tmp_path):
    from prunetune.methods.sheared.domain_training import DomainSettings
    from prunetune.runs.settings import EvalSettings, RunOptions
    from prunetune.methods.sheared.shear import shear

    source = tiny_model_dir("qwen2")  # tied embeddings, q/k/v biases
    options = RunOptions(training=TrainSettings(steps=4, batch_size=2, seq_len=32, lr=1e-3), progress=False)
    record = shear(str(source), tmp_path / "out", ShearSettings(target="hidden=64,heads=3,kv-heads=3", lora=True),
                   DomainSettings(data="prose=builtin:pydoc", eval_every=2, eval_blocks=2),
                   EvalSettings(data=None, seq_len=32, max_windows=2), options, log=lambda _: None)
    assert record["checks"]["masked_vs_cut_max_abs_logit_diff"] < 1e-4
    assert record["architecture"]["layer_shapes"] == [{"num_heads": 3, "num_kv_heads": 3, "intermediate": 48}] * 4
    assert record["parameters"]["after"]["total"] == record["parameters"]["target"]
    assert record["training"]["distill"]["teacher_model_bytes"] == 0  # the model itself, masks and LoRA off


def test_train_with_distill_but_no_teacher_is_one_line(model_dir, tmp_path, no_model_load):
    done = run_cli("train", str(model_dir), "--data", DOMAINS, "--references", "code=3,prose=3", "--distill",
                   "--steps", "2", *SMALL, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(done, "--teacher")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, message", [
    ("layers=4,hidden=96,heads=6,kv-heads=3,intermediate=48", "own shape"),
    ("heads=5", "divisible"),
    ("layers=8", "larger"),
])
def test_bad_target_is_one_line_and_leaves_nothing(model_dir, tmp_path, target, message, no_model_load):
    done = run_cli("shear", str(model_dir), "--target", target, "--steps", "2", "--out", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert_user_error(done, message)
    assert not (tmp_path / "out").exists()


def test_negative_lambda2_init_is_one_line_and_leaves_nothing(model_dir, tmp_path, no_model_load):
    done = run_cli("shear", str(model_dir), "--target", TARGET, "--lambda2-init", "-1", "--steps", "2",
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(done, "--lambda2-init")
    assert not (tmp_path / "out").exists()


def test_train_without_references_is_one_line(model_dir, tmp_path, no_model_load):
    done = run_cli("train", str(model_dir), "--data", DOMAINS, "--dynamic-loading", "--steps", "2", *SMALL,
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(done, "reference")
    assert not (tmp_path / "out").exists()


def _shear_setup(seed: int = 0, steps: int = 8, warmup_steps: int = 4, lambda2_init: float = 0.0):
    """A tiny model with masks and a two-domain sampler, as `shear` builds them (random token domains)."""
    torch.manual_seed(seed)
    model = tiny_model("qwen3")
    for p in model.parameters():
        p.requires_grad_(True)
    structure = Structure.of(model)
    target = parse_target("layers=3,heads=3,kv-heads=3,intermediate=32", structure)
    settings = TrainSettings(steps=steps, batch_size=2, seq_len=16, lr=1e-3, checkpoint_every=1, seed=seed)
    generator = torch.Generator().manual_seed(5)
    blocks = torch.cat([torch.randint(0, 48, (12, 16), generator=generator),
                        torch.randint(48, 96, (12, 16), generator=generator)])
    mask = torch.ones_like(blocks, dtype=torch.bool)
    domains = parse_domains("a=builtin:pydoc,b=builtin:stdlib-code")
    sampler = DomainSampler([(0, 12), (12, 24)], settings, 1, 0, domains.weights)
    eval_sets = {"a": (blocks[:2], mask[:2]), "b": (blocks[12:14], mask[12:14])}
    dynamic = DynamicLoading(model, sampler, ["a", "b"], eval_sets, {"a": 3.0, "b": 4.0}, eval_every=2,
                             batch_size=2)
    masks = ShearMasks(structure, target, warmup_steps=warmup_steps, lambda2_init=lambda2_init)
    handle = masks.attach(model)
    hooks = ComposedHooks(ShearHooks(masks, ShearSettings(target="x", lambda2_init=lambda2_init,
                                                          mask_init="uniform")), dynamic)
    return model, masks, handle, hooks, sampler, blocks, mask, settings


def test_resumed_shear_ends_where_an_uninterrupted_one_does(tmp_path):
    model, masks, _, hooks, sampler, blocks, mask, settings = _shear_setup()
    whole = train(model, blocks, mask, settings, hooks=hooks, sampler=sampler, progress=False)
    expected_alpha = {k: v.clone() for k, v in masks.state_dict().items()}
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    model, masks, _, hooks, sampler, blocks, mask, settings = _shear_setup()
    train(model, blocks, mask, settings, hooks=hooks, sampler=sampler, checkpoint_dir=tmp_path, stop_after=5,
          progress=False)
    model, masks, _, hooks, sampler, blocks, mask, settings = _shear_setup()  # a fresh process, as after a kill
    before_kill = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["seconds"]
    resumed = train(model, blocks, mask, settings, hooks=hooks, sampler=sampler, checkpoint_dir=tmp_path,
                    resume=True, progress=False)
    assert resumed.resumed_from_step == 5
    assert 0 < before_kill < resumed.seconds  # the record's time counts the steps before the kill too
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], abs=1e-5)
    assert [h["domain_weights"] for h in resumed.history] == [h["domain_weights"] for h in whole.history]
    for key, value in masks.state_dict().items():
        torch.testing.assert_close(value, expected_alpha[key], atol=1e-5, rtol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected_weights[key], atol=1e-5, rtol=0)


def test_shearing_moves_the_masks_towards_the_target():
    """layers=3,heads=3,intermediate=32 from 4 layers, 6 heads and 48 channels: the Lagrangian's target
    warms up linearly from the source's counts to those over the 4 warm-up steps; every mask type's
    expected count falls step by step and ends less than half as far from its target as it started;
    the final masks keep exactly the target's counts."""
    model, masks, _, hooks, sampler, blocks, mask, settings = _shear_setup(steps=12, warmup_steps=4)
    run = train(model, blocks, mask, settings, hooks=hooks, sampler=sampler, progress=False)
    source, goal = {"layer": 4, "head": 6, "intermediate": 48}, {"layer": 3, "head": 3, "intermediate": 32}
    for kind in ("layer", "head", "intermediate"):
        history = [h["masks"] for h in run.history]
        warmed = [goal[kind] + (source[kind] - goal[kind]) * max(0.0, 1 - step / 4) for step in range(12)]
        assert [h[f"target_{kind}"] for h in history] == pytest.approx(warmed), kind
        expected = [h[f"expected_{kind}"] for h in history]
        assert all(later <= earlier + 1e-6 for earlier, later in zip(expected, expected[1:])), (kind, expected)
        assert abs(expected[-1] - goal[kind]) < 0.5 * abs(expected[0] - goal[kind]), (kind, expected)
    final, _ = masks.final()
    assert int(final.layers.sum()) == goal["layer"]
    assert all(int(final.heads[i].sum()) == goal["head"] for i in range(4))
    assert all(int(final.channels[i].sum()) == goal["intermediate"] for i in range(4))


def test_a_stiff_lambda2_start_keeps_the_masks_on_the_warming_target():
    """From the official start (λ1 = λ2 = 0), λ1 winds up while the masks trail the warm-up and the
    expected count then overshoots; a stiff λ2 start tracks the target (the default, --lambda2-init)."""
    errors = {}
    for start in (0.0, ShearSettings().lambda2_init):
        model, masks, _, hooks, sampler, blocks, mask, settings = _shear_setup(steps=24, warmup_steps=12,
                                                                                lambda2_init=start)
        assert masks.lambdas["lambda_2_intermediate"].item() == start
        assert masks.lambdas["lambda_1_intermediate"].item() == 0
        run = train(model, blocks, mask, settings, hooks=hooks, sampler=sampler, progress=False)
        size = masks.distributions["intermediate"].size
        goal = masks.target_fraction("intermediate", settings.steps).mean().item() * size
        after_warmup = [h["masks"]["expected_intermediate"] for h in run.history[12:]]
        errors[start] = sum(abs(e - goal) for e in after_warmup) / len(after_warmup) / goal
    official, stiff = errors.values()
    assert stiff < 0.3 * official, errors


def test_train_distils_from_a_teacher_cache_built_once_and_reused(model_dir, tmp_path, short_text):
    from prunetune.methods.sheared.continued import ContinueSettings, continue_training
    from prunetune.methods.sheared.domain_training import DomainSettings
    from prunetune.runs.settings import EvalSettings, RunOptions
    from prunetune.training.distill import DistillSettings

    cache = tmp_path / "cache"
    records = []
    for seed in (0, 1):
        options = RunOptions(training=TrainSettings(steps=3, batch_size=2, seq_len=32, lr=2e-2, seed=seed),
                             progress=False)
        records.append(continue_training(
            str(model_dir), tmp_path / f"out{seed}", ContinueSettings(
                teacher=str(model_dir), distill=DistillSettings(cache=str(cache), top_k=8)),
            DomainSettings(data=f"prose={short_text}", references="prose=3"),
            EvalSettings(data=None, seq_len=32, max_windows=2),
            options, log=lambda _: None))
    first, second = (r["training"]["distill"]["teacher_cache"] for r in records)
    assert first["built"] and first["rows"] > 0 and first["teacher_model_bytes"] > 0
    assert not second["built"] and second["path"] == str(cache / "teacher-topk.safetensors")
    assert all(r["training"]["distill"]["teacher_model_bytes"] is None for r in records)  # no second model held
    for r in records:  # the student starts as its teacher, then moves away from it
        first_step, last_step = r["training"]["history"][0], r["training"]["history"][-1]
        assert abs(first_step["distill_loss"]) < 1e-5 < last_step["distill_loss"]


def test_a_teacher_cache_without_distillation_is_one_line(model_dir, tmp_path, no_model_load):
    done = run_cli("train", str(model_dir), "--data", DOMAINS, "--references", "code=3,prose=3", "--no-distill",
                   "--teacher-cache", str(tmp_path / "cache"), "--steps", "2", *SMALL, "--out", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert_user_error(done, "--teacher-cache")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_shear_reads_a_teacher_cache_and_refuses_one_with_lora(tiny_model_dir, tmp_path, short_text):
    from prunetune.errors import SettingError
    from prunetune.methods.sheared.domain_training import DomainSettings
    from prunetune.methods.sheared.shear import shear
    from prunetune.runs.settings import EvalSettings, RunOptions
    from prunetune.training.distill import DistillSettings

    source = tiny_model_dir("llama")
    options = RunOptions(training=TrainSettings(steps=3, batch_size=2, seq_len=32, lr=1e-3), progress=False)
    domains = DomainSettings(data=f"prose={short_text}", eval_every=2, eval_blocks=2)
    evaluation = EvalSettings(data=None, seq_len=32, max_windows=2)
    cached = DistillSettings(cache=str(tmp_path / "cache"), top_k=8)
    record = shear(str(source), tmp_path / "out", ShearSettings(target="heads=3,kv-heads=3", distill=cached),
                   domains, evaluation, options, log=lambda _: None)
    distill = record["training"]["distill"]
    assert distill["held_as"] == "its top-k cached" and distill["teacher_cache"]["built"]
    assert distill["teacher_model_bytes"] is None
    with pytest.raises(SettingError, match="DistillSettings.cache"):
        shear(str(source), tmp_path / "lora", ShearSettings(target="heads=3,kv-heads=3", lora=True, distill=cached),
              domains, evaluation, options, log=lambda _: None)
    assert not (tmp_path / "lora").exists()
