"""The cached top-k teacher: with k the whole vocabulary it is the full KL, with fewer it is the KL of
the coarsened distributions (never negative, zero for a student that is the teacher), the file is
reused only for what it was built for, and a row it lacks is a one-line error."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tokens

from prunetune.errors import UserError
from prunetune.training.distill import DistillLoss, DistillSettings, ModelTeacher
from prunetune.training.teacher_cache import CacheKey, CachedTeacher, build_cache, open_cache

VOCAB = 96  # tiny.tiny_config's vocabulary


def _cache(teacher, blocks, tmp_path, top_k, temperature=1.0, name="cache"):
    key = CacheKey(teacher="tiny", top_k=top_k, temperature=temperature, seq_len=blocks.shape[1])
    build_cache(teacher, blocks, tmp_path / name / "teacher-topk.safetensors", key, batch_size=2, device="cpu")
    cached, why = open_cache(tmp_path / name / "teacher-topk.safetensors", key, blocks)
    assert cached is not None, why
    return cached


def _loss_and_grads(student, teacher, ids, labels, temperature):
    student.zero_grad()
    objective = DistillLoss(student, teacher, DistillSettings(enabled=True, alpha=0.5, temperature=temperature))
    loss = objective(ids, labels)
    loss.backward()
    return loss.detach(), objective.terms["distill"], {n: p.grad.clone() for n, p in student.named_parameters()
                                                       if p.grad is not None}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_cache_of_the_whole_vocabulary_gives_the_full_distillation_loss_and_gradient(tmp_path, temperature):
    student, teacher = tiny_model("llama", seed=0).train(), tiny_model("llama", seed=1).eval()
    ids = tokens(batch=4, length=12)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, -100)
    cached = _cache(teacher, ids, tmp_path, top_k=VOCAB, temperature=temperature)
    want, want_kl, want_grads = _loss_and_grads(student, ModelTeacher(teacher), ids, labels, temperature)
    got, got_kl, got_grads = _loss_and_grads(student, cached, ids, labels, temperature)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_kl, want_kl, atol=1e-5)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5), name


def test_top_k_distillation_is_zero_for_the_teacher_itself_and_positive_for_another_student(tmp_path):
    teacher = tiny_model("llama", seed=1).eval()
    ids = tokens(batch=2, length=12)
    cached = _cache(teacher, ids, tmp_path, top_k=5)
    assert cached.lookup(ids)[0].shape == (2, 11, 5)
    for p in teacher.parameters():
        p.requires_grad_(True)
    _, itself, _ = _loss_and_grads(teacher, cached, ids, ids, 1.0)
    assert abs(float(itself)) < 1e-5
    _, other, _ = _loss_and_grads(tiny_model("llama", seed=0).train(), cached, ids, ids, 1.0)
    assert float(other) > 1e-3


def test_the_cache_is_reused_only_for_what_it_was_built_for(tmp_path):
    teacher = tiny_model("llama", seed=1).eval()
    blocks = tokens(batch=3, length=12)
    path = tmp_path / "c" / "teacher-topk.safetensors"
    key = CacheKey(teacher="tiny", top_k=4, temperature=1.0, seq_len=12)
    assert open_cache(path, key, blocks) == (None, "no cache yet")
    info = build_cache(teacher, torch.cat([blocks, blocks[:1]]), path, key, batch_size=2, device="cpu")
    assert info["rows"] == 3 and not path.with_name(path.name + ".partial").exists()  # a repeated row once
    assert open_cache(path, key, blocks)[1] == "reused"
    assert "built for" in open_cache(path, CacheKey("tiny", 8, 1.0, 12), blocks)[1]
    assert "built for" in open_cache(path, CacheKey("tiny", 4, 2.0, 12), blocks)[1]
    other = tokens(batch=2, length=12, seed=7)
    assert open_cache(path, key, torch.cat([blocks, other]))[1] == "lacks 2 of this run's 5 training rows"
    path.write_bytes(b"not a cache")
    assert open_cache(path, key, blocks)[0] is None


def test_a_row_the_cache_lacks_is_a_one_line_error(tmp_path):
    teacher = tiny_model("llama", seed=1).eval()
    cached = _cache(teacher, tokens(batch=2, length=12), tmp_path, top_k=4)
    with pytest.raises(UserError, match="has no entry for a training row") as error:
        cached.lookup(tokens(batch=1, length=12, seed=9))
    assert "\n" not in str(error.value)
    assert isinstance(cached, CachedTeacher)
