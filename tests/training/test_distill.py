"""Self-distillation: the chunked KL equals the full-logits one, the teacher is the unpruned (and, for
`base`, un-adapted) model, and distilled LoRAPrune and recovery runs work, resume and record their cost."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_user_error, run_cli
from tiny import ARCHITECTURES, tiny_model, tokens

from prunetune.training import distill as distill_module
from prunetune.training.distill import (
    DistillLoss,
    DistillSettings,
    ModelTeacher,
    chunked_distillation,
    self_teacher_for,
)
from prunetune.errors import UserError
from prunetune.training.loss import FinalHidden
from prunetune.training.lora import LoraSettings, add_lora
from prunetune.methods.loraprune.pruner import LoRAPruneSettings, LoRAPruner
from prunetune.runs.settings import EvalSettings, RunOptions, checkpoint_dir_for
from prunetune.methods.prune import PruneSettings, prune
from prunetune.structure.masks import Masks, apply_masks
from prunetune.structure.units import Structure
from prunetune.training.loop import TrainSettings


def _reference(student_logits, teacher_logits, labels, temperature):
    """The textbook loss on full logits: mean CE and mean KL(teacher ‖ student) over labelled positions."""
    s, t, y = student_logits[:, :-1].flatten(0, 1), teacher_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    valid = y != -100
    ce = F.cross_entropy(s, y, ignore_index=-100)
    kl = F.kl_div(F.log_softmax(s[valid] / temperature, -1), F.log_softmax(t[valid] / temperature, -1),
                  log_target=True, reduction="batchmean")
    return ce, kl


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_distillation_equals_full_logits(arch, temperature, monkeypatch):
    monkeypatch.setattr(distill_module, "MIN_CHUNK", 5)  # several chunks, the last one short
    monkeypatch.setattr(distill_module, "CHUNK_ELEMENTS", 96 * 10)
    student, teacher = tiny_model(arch, seed=0).train(), tiny_model(arch, seed=1).eval()
    for p in student.parameters():
        p.requires_grad_(True)
    ids = tokens(batch=3, length=12)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, -100)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    student.zero_grad()
    ce_want, kl_want = _reference(student(input_ids=ids).logits, teacher_logits, labels, temperature)
    (kl_want + ce_want).backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    s_hidden = FinalHidden(student)(ids)
    t_hidden = ModelTeacher(teacher).hidden(ids)
    ce, kl = chunked_distillation(s_hidden, t_hidden, labels, student.lm_head, teacher.lm_head, temperature)
    (kl + ce).backward()
    torch.testing.assert_close(ce, ce_want)
    torch.testing.assert_close(kl, kl_want, rtol=1e-4, atol=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(dict(student.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def _pruner(model, structure):
    return LoRAPruner(model, structure, ratio=0.5, layers=[1, 2], units=("heads", "channels"), head_unit="kv-group",
                      round_to=8, allocation="uniform", settings=LoRAPruneSettings(), total_steps=10)


@pytest.mark.parametrize("teacher", ["base", "tuned"])
def test_self_teacher_is_the_unpruned_model(teacher):
    base = tiny_model("llama", intermediate_size=64)
    ids = tokens()
    with torch.no_grad():
        pretrained = base(input_ids=ids).logits
    structure = Structure.of(base)
    model = add_lora(base, LoraSettings(dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter, so base and tuned differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        tuned = model(input_ids=ids).logits
    pruner = _pruner(model, structure)
    pruner._apply(Masks(heads={1: torch.tensor([True, True, True, True, False, False])},
                        channels={2: torch.arange(64) < 16}))
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    self_teacher = self_teacher_for(model, pruner.masks_off, DistillSettings(enabled=True, teacher=teacher))
    logits = self_teacher.head(self_teacher.hidden(ids))
    torch.testing.assert_close(logits, pretrained if teacher == "base" else tuned)
    assert not torch.allclose(masked, tuned)
    with torch.no_grad():  # the masks and the adapter are back after the teacher's pass
        torch.testing.assert_close(model(input_ids=ids).logits, masked)


def test_distill_loss_records_both_terms_and_alpha_mixes_them():
    base = tiny_model("qwen3")
    structure = Structure.of(base)
    model = add_lora(base, LoraSettings(dropout=0.0))
    hooks = apply_masks(model, Masks(channels={0: torch.arange(structure.layers[0].intermediate) < 8}))
    ids = tokens()
    for alpha in (1.0, 0.25):
        settings = DistillSettings(enabled=True, alpha=alpha, temperature=2.0)
        loss_fn = DistillLoss(model, self_teacher_for(model, hooks.suspended, settings), settings)
        loss = loss_fn(ids, ids)
        lm, kl = loss_fn.terms["lm"], loss_fn.terms["distill"]
        torch.testing.assert_close(loss.detach(), alpha * 4.0 * kl + (1 - alpha) * lm)
        assert kl > 0 and loss_fn.teacher_state_bytes == ids.numel() * structure.hidden * 4  # fp32


def test_a_teacher_of_another_vocabulary_is_refused():
    with pytest.raises(UserError, match="vocabulary"):
        DistillLoss(tiny_model("llama"), ModelTeacher(tiny_model("llama", vocab_size=120)),
                    DistillSettings(enabled=True))


# -- end to end through `prune` ----------------------------------------------------------------------

EVAL = EvalSettings(data="builtin:pydoc", seq_len=32, max_windows=2)


def _options(steps=8, quant=None, **kw):
    return RunOptions(training=TrainSettings(steps=steps, batch_size=2, seq_len=32, lr=1e-3, **kw), quant=quant,
                      progress=False)


def _settings(distill=True, **kw) -> PruneSettings:
    return PruneSettings(**kw, loraprune=LoRAPruneSettings(prune_every=2), distill=DistillSettings(enabled=distill))


def test_distilled_loraprune_records_the_teacher_and_resumes_to_the_same_masks(wide_model_dir, tmp_path):
    settings = _settings(method="loraprune", ratio=0.5, round_to=8)
    whole = prune(str(wide_model_dir), tmp_path / "whole", settings, EVAL, _options(checkpoint_every=3),
                  log=lambda _: None)
    training = whole["training"]
    assert all("distill_loss" in entry for entry in training["history"])
    assert training["distill"]["teacher"] == str(wide_model_dir) and training["distill"]["teacher_model_bytes"] == 0
    assert training["distill"]["held_as"] == "the trained model, its masks off and its adapters off"
    assert training["distill"]["teacher_seconds"] > 0
    assert whole["settings"]["distill"]["enabled"]

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # killed after step 4 (checkpoint at 3)
        import prunetune.training.loop as train_module

        original = train_module._save_checkpoint

        def save_then_die(path, accelerator, model, optimizer, scheduler, hooks, step, result):
            original(path, accelerator, model, optimizer, scheduler, hooks, step, result)
            if step == 3:
                raise KeyboardInterrupt

        train_module._save_checkpoint = save_then_die
        try:
            prune(str(wide_model_dir), out, settings, EVAL, _options(checkpoint_every=3), log=lambda _: None)
        finally:
            train_module._save_checkpoint = original
    assert checkpoint_dir_for(out).exists() and not out.exists()
    options = _options(checkpoint_every=3)
    options.resume = True
    resumed = prune(str(wide_model_dir), out, settings, EVAL, options, log=lambda _: None)
    assert resumed["kept"] == whole["kept"]
    assert [e["loss"] for e in resumed["training"]["history"]] == pytest.approx(
        [e["loss"] for e in training["history"]], rel=1e-5)


def test_distilled_recovery_loads_the_source_as_teacher_and_says_what_it_costs(wide_model_dir, tmp_path):
    settings = _settings(method="magnitude", ratio=0.5, round_to=8, recover_steps=3)
    record = prune(str(wide_model_dir), tmp_path / "t", settings, EVAL, _options(), log=lambda _: None)
    info = record["training"]["distill"]
    assert info["teacher"] == str(wide_model_dir) and info["held_as"] == "a second copy"
    assert info["teacher_model_bytes"] > 0
    # the second model's weights are live through training: the peak counts them (as a GPU's would)
    plain = prune(str(wide_model_dir), tmp_path / "plain", _settings(distill=False, method="magnitude", ratio=0.5,
                                                                     round_to=8, recover_steps=3),
                  EVAL, _options(), log=lambda _: None)
    added = record["training"]["peak_memory_bytes"] - plain["training"]["peak_memory_bytes"]
    assert added >= info["teacher_model_bytes"]
    assert json.loads((tmp_path / "t" / "prunetune.json").read_text())["training"]["distill"] == info


def test_distilled_recovery_from_a_teacher_cache_holds_no_second_model_and_reuses_it(wide_model_dir, tmp_path,
                                                                                     short_text):
    """--teacher-cache: the first recovery builds the source's top-k and frees the source before training;
    a second one on the same blocks reuses the file and trains to the same losses."""
    cache = tmp_path / "cache"

    def settings():
        chosen = _settings(method="magnitude", ratio=0.5, round_to=8, recover_steps=3, data=short_text)
        chosen.distill.cache, chosen.distill.top_k = str(cache), 8
        return chosen

    built, reused = (prune(str(wide_model_dir), tmp_path / name, settings(), EVAL, _options(), log=lambda _: None)
                     for name in ("built", "reused"))
    copy = settings()
    copy.distill.cache = None
    second_copy = prune(str(wide_model_dir), tmp_path / "copy", copy, EVAL, _options(), log=lambda _: None)
    first, second = (r["training"]["distill"] for r in (built, reused))
    assert first["held_as"] == "its top-k cached" and first["teacher_model_bytes"] is None
    assert first["teacher_cache"]["built"] and first["teacher_cache"]["teacher_model_bytes"] > 0
    assert not second["teacher_cache"]["built"]
    assert [e["loss"] for e in built["training"]["history"]] == [e["loss"] for e in reused["training"]["history"]]
    # the source left memory before training: the peak lacks the second copy's weights
    saved = second_copy["training"]["peak_memory_bytes"] - built["training"]["peak_memory_bytes"]
    assert saved >= second_copy["training"]["distill"]["teacher_model_bytes"]


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_distilled_loraprune_on_a_quantized_base(wide_model_dir, tmp_path, quant):
    """The teacher is the quantized base itself (no second copy). Until the first mask update (after
    step 2) the student is that teacher (LoRA's B starts at zero, no unit is masked; one step of B
    changes little): the KL is zero to rounding. Once half the units are masked it is not."""
    record = prune(str(wide_model_dir), tmp_path / quant, _settings(method="loraprune", ratio=0.5, round_to=8), EVAL,
                   _options(steps=4, quant=quant, gradient_checkpointing=True), log=lambda _: None)
    training = record["training"]
    assert training["distill"]["teacher_model_bytes"] == 0 and "masks off" in training["distill"]["held_as"]
    assert [(s["step"], s["fraction"]) for s in training["schedule"]] == [(2, 1.0), (4, 1.0)]
    kl = [e["distill_loss"] for e in training["history"]]
    assert all(abs(value) < 2e-5 for value in kl[:2]), kl  # unmasked: the student is the teacher
    assert all(value > 1e-4 for value in kl[2:]), kl  # masked: the student departs from it


def test_distill_flags_that_cannot_work_fail_before_loading(tmp_path):
    missing_model = str(tmp_path / "no-model-here")  # loading it would fail differently
    cases = [
        (_settings(method="magnitude"), "use it with loraprune or with PruneSettings.recover_steps"),
        (_settings(method="taylor", recover_steps=2), "DistillSettings.teacher tuned is LoRAPrune's"),
    ]
    for settings, message in cases:
        settings.distill.teacher = "tuned" if settings.recover_steps else "base"
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            prune(missing_model, tmp_path / "out", settings, EVAL, _options(), log=lambda _: None)
    settings = _settings(method="loraprune")
    settings.distill.cache = str(tmp_path / "cache")  # its teacher is itself: nothing to cache
    with pytest.raises(UserError, match="DistillSettings.cache is for a one-shot method's recovery"):
        prune(missing_model, tmp_path / "out", settings, EVAL, _options(), log=lambda _: None)
    settings = _settings(method="loraprune")
    settings.distill.temperature = 0
    with pytest.raises(UserError, match="temperature"):
        prune(missing_model, tmp_path / "out", settings, EVAL, _options(), log=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", [["prune", "--method", "loraprune"], ["prune", "--method", "taylor"]])
def test_a_teacher_cache_where_no_second_model_teaches_is_one_line(wide_model_dir, tmp_path, no_model_load, command):
    """LoRAPrune's teacher is itself; a one-shot prune without --recover-steps has no training at all."""
    done = run_cli(*command, str(wide_model_dir), "--teacher-cache", str(tmp_path / "cache"), "--out",
                   str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(done, "--teacher-cache" if "loraprune" in command else "--distill")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_distillation_is_loraprunes_default_and_off_for_one_shot_recovery():
    assert DistillSettings().resolved("loraprune").enabled
    assert not DistillSettings().resolved("taylor").enabled
    assert not DistillSettings(enabled=False).resolved("loraprune").enabled  # --no-distill: the paper's recipe
    assert DistillSettings(enabled=True).resolved("taylor").enabled


def test_loraprune_mixes_half_the_language_model_loss_by_default_and_recovery_distils_only():
    assert DistillSettings().resolved("loraprune").alpha == 0.5
    assert DistillSettings(enabled=True).resolved("taylor").alpha == 1.0
    assert DistillSettings(alpha=0.8).resolved("loraprune").alpha == 0.8  # --distill-alpha wins
    model = add_lora(tiny_model("llama"), LoraSettings())
    self_taught = DistillLoss(model, self_teacher_for(model, contextlib.nullcontext, DistillSettings(enabled=True)),
                              DistillSettings(enabled=True))
    assert self_taught.settings.alpha == 0.5  # a library caller's open alpha: the self-teacher is LoRAPrune's
    assert DistillLoss(model, ModelTeacher(tiny_model("llama")), DistillSettings(enabled=True)).settings.alpha == 1.0


def test_loraprune_schedule_defaults_reach_the_target_at_half_the_steps():
    from prunetune.methods.loraprune.pruner import cubic_fraction

    settings = LoRAPruneSettings()
    assert (settings.warmup, settings.cooldown) == (0.05, 0.5)
    assert cubic_fraction(5, 100, settings.warmup, settings.cooldown) == 0.0
    assert cubic_fraction(50, 100, settings.warmup, settings.cooldown) == 1.0
    assert 0 < cubic_fraction(20, 100, settings.warmup, settings.cooldown) < 1
