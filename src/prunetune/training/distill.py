"""Distillation from a teacher's next-token distributions, without a full-vocabulary logits tensor.

    objective = α · T² · KL(p_teacher,T ‖ p_student,T) + (1 − α) · cross-entropy

both means over the labelled positions (α `--distill-alpha`, T `--distill-temperature`; T² keeps
the gradient's size independent of T, as in Hinton et al.). The teacher and the student each run
their own forward with no logits kept; only their last hidden states are held, and the loss is
summed over chunks of positions, each chunk's student and teacher logits built under activation
checkpointing (as lm_loss.py does for the plain loss), so one chunk of logits exists at a time.

Teachers:
- `SelfTeacher`: the model being trained, run without gradients with its pruning masks suspended:
  the unpruned model at no memory cost. `adapters=False` (`--teacher base`) also disables the LoRA
  adapters: the pretrained model, for recovering what pruning removed. `adapters=True`
  (`--teacher tuned`) keeps them: the unpruned model as it is being fine-tuned.
- `ModelTeacher`: a second model (the source of a one-shot prune, loaded again for recovery).
- `CachedTeacher` (teacher_cache.py): a second model's top-k next-token log-probabilities, computed
  once and read from disk, so full-parameter training holds no second model.

Both run in eval mode (no dropout, no checkpointing) and outside DDP's wrapper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import SettingError, UserError
from ..modeling import eval_mode
from .loss import CHUNK_ELEMENTS, FinalHidden
from .teacher_cache import DEFAULT_TOP_K, CacheKey, CachedTeacher, cached_source_teacher
from .tensor_memory import module_tensors

TEACHERS = ("base", "tuned")
# Positions per chunk: half the plain loss's (a distillation chunk holds the student's and the
# teacher's logits and their softmaxes at once), at least 64.
MIN_CHUNK = 64
LORAPRUNE_ALPHA = 0.5


# Per method, what `enabled` and `alpha` left at None mean: (on, weight of the distillation term).
# LoRAPrune's and shearing-with-LoRA's teacher is the model being trained with its masks off (no
# memory); a one-shot recovery's is a second copy, so it is off unless asked for. Half and half was
# measured best for LoRAPrune (docs/results/quality.md) and for shearing (docs/results/sheared.md).
METHOD_DEFAULTS = {"loraprune": (True, LORAPRUNE_ALPHA), "sheared": (True, 0.5), "continued": (True, 0.5),
                   # LoRAM's alignment: the pruned model learns the full model's distributions alone
                   "loram-align": (True, 1.0)}
OTHER_DEFAULT = (False, 1.0)


@dataclass
class DistillSettings:
    # None: the method's default (METHOD_DEFAULTS): on for LoRAPrune and Sheared-LLaMA, off for
    # one-shot recovery (its teacher is a second copy of the model)
    enabled: bool | None = None
    temperature: float = 1.0
    # Weight of the distillation term; 1 - alpha goes to the language-model loss. None: the method's
    # default (METHOD_DEFAULTS), 1 for one-shot recovery.
    alpha: float | None = None
    teacher: str = "base"  # LoRAPrune: base (adapters off) or tuned (adapters on)
    # A second model's top-k next tokens cached in this directory (built once, then reused) instead of
    # the model itself in memory (teacher_cache.py): wherever the teacher is another model (full-parameter
    # shearing, continued training, a one-shot method's recovery, LoRAM's alignment)
    cache: str | None = None
    top_k: int = DEFAULT_TOP_K

    def resolved(self, method: str) -> "DistillSettings":
        """These settings with `enabled` and `alpha` decided for a method (METHOD_DEFAULTS)."""
        enabled, alpha = METHOD_DEFAULTS.get(method, OTHER_DEFAULT)
        return dataclasses.replace(self, enabled=enabled if self.enabled is None else self.enabled,
                                   alpha=alpha if self.alpha is None else self.alpha)

    def check_model_teacher(self, who: str) -> None:
        """`check()` for a method whose teacher is a model (its source, or one it names): the `tuned`
        teacher, LoRAPrune's own adapters, has no meaning there."""
        self.check()
        if self.teacher != "base":
            raise SettingError("DistillSettings.teacher", f"{who} distils from a model, not from its own adapters: "
                               "leave DistillSettings.teacher at base")

    def check(self) -> None:
        if self.temperature <= 0:
            raise SettingError("DistillSettings.temperature",
                               f"DistillSettings.temperature must be positive, got {self.temperature}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise SettingError("DistillSettings.alpha", "DistillSettings.alpha is the distillation term's weight "
                               f"in [0, 1], got {self.alpha}")
        if self.top_k < 1:
            raise SettingError("DistillSettings.top_k", f"DistillSettings.top_k must be at least 1, got {self.top_k}")
        if self.cache and self.enabled is False:
            raise SettingError("DistillSettings.cache", "DistillSettings.cache holds a teacher's distributions and "
                               "needs distillation (DistillSettings.enabled)")
        if self.teacher not in TEACHERS:
            raise SettingError("DistillSettings.teacher", f"unknown DistillSettings.teacher '{self.teacher}'; use "
                               f"{' or '.join(TEACHERS)}")


class SelfTeacher:
    """The training model itself with its masks suspended (and, for `base`, its adapters disabled)."""

    def __init__(self, model: nn.Module, masks_off: Callable[[], contextlib.AbstractContextManager],
                 adapters: bool):
        self.model = model  # the PEFT model, not a DDP wrapper: the teacher pass needs no gradient sync
        self.masks_off = masks_off
        self.adapters = adapters
        self.final_hidden = FinalHidden(model)
        self.head = self.final_hidden.head

    def held_tensors(self) -> list[torch.Tensor]:
        """What this teacher holds beyond the trained model: nothing, it is that model."""
        return []

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        adapters_off = contextlib.nullcontext() if self.adapters else self.model.disable_adapter()
        with self.masks_off(), adapters_off, eval_mode(self.model), torch.no_grad():
            return self.final_hidden(ids)


class ModelTeacher:
    """A separate, frozen model (the unpruned source of a one-shot prune)."""

    def __init__(self, model: nn.Module):
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.final_hidden = FinalHidden(model)
        self.head = self.final_hidden.head

    def held_tensors(self) -> list[torch.Tensor]:
        """The second model's weights, held through the whole run."""
        return module_tensors(self.model)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model), torch.no_grad():
            return self.final_hidden(ids)


class DistillLoss:
    """`loss(ids, labels)`: the distillation objective of `model` against `teacher`; `terms` holds the
    last call's language-model loss and KL divergence (detached) for the log, `teacher_seconds` the
    time spent in teacher passes and `teacher_state_bytes` the largest teacher state held."""

    def __init__(self, model: nn.Module, teacher, settings: DistillSettings):
        self.model = model
        self.teacher = teacher
        if settings.alpha is None:  # left open by a library caller: the default of the method this teacher serves
            settings = dataclasses.replace(
                settings, alpha=settings.resolved("loraprune" if isinstance(teacher, SelfTeacher)
                                                  else "recovery").alpha)
        self.settings = settings
        self.final_hidden = FinalHidden(model)
        self.cached = isinstance(teacher, CachedTeacher)
        if not (self.final_hidden.available and (self.cached or teacher.final_hidden.available)):
            raise UserError("distillation needs models whose forward takes logits_to_keep (transformers >= 4.45)")
        student_vocab = self.final_hidden.head.weight.shape[0]
        teacher_vocab = teacher.vocab if self.cached else teacher.head.weight.shape[0]
        if student_vocab != teacher_vocab:
            raise UserError(f"the teacher's vocabulary ({teacher_vocab}) differs from the student's ({student_vocab})")
        self.terms: dict[str, torch.Tensor] = {}
        self.teacher_seconds = 0.0
        self.teacher_state_bytes = 0

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        teacher_state = self.teacher.lookup(ids) if self.cached else (self.teacher.hidden(ids),)
        self.teacher_seconds += time.perf_counter() - started
        self.teacher_state_bytes = max(self.teacher_state_bytes,
                                       sum(t.numel() * t.element_size() for t in teacher_state))
        student_hidden = self.final_hidden(ids)
        if self.cached:
            lm, kl = chunked_topk_distillation(student_hidden, *teacher_state, labels, self.final_hidden.head,
                                               self.settings.temperature)
        else:
            lm, kl = chunked_distillation(student_hidden, teacher_state[0], labels, self.final_hidden.head,
                                          self.teacher.head, self.settings.temperature)
        self.terms = {"lm": lm.detach(), "distill": kl.detach()}
        alpha, t = self.settings.alpha, self.settings.temperature
        if alpha == 1.0:
            return t * t * kl
        return alpha * t * t * kl + (1.0 - alpha) * lm

    def record(self, steps: int) -> dict:
        """The run record's `distill` entry: what the teacher cost."""
        return {
            "temperature": self.settings.temperature, "alpha": self.settings.alpha,
            "teacher_seconds": round(self.teacher_seconds, 2),
            "teacher_seconds_per_step": round(self.teacher_seconds / max(1, steps), 3),
            "teacher_state_bytes": self.teacher_state_bytes,
        }


def chunked_distillation(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, student_head: nn.Module,
                         teacher_head: nn.Module, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean KL(teacher ‖ student) at `temperature`) of predicting labels[:, t+1]
    from position t, over the labelled positions, one chunk of positions at a time."""
    t_states = teacher[:, :-1].reshape(-1, teacher.shape[-1]).detach()
    return _over_chunks(_distill_sums, student, labels, student_head, [t_states], teacher_head, temperature)


def chunked_topk_distillation(student: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                              rest: torch.Tensor, labels: torch.Tensor, head: nn.Module, temperature: float = 1.0
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean KL over the teacher's top k and the rest, teacher_cache.py) of a cached
    teacher's positions (every position but the last), one chunk of positions at a time."""
    per_position = [top_ids.reshape(-1, top_ids.shape[-1]), top_logp.reshape(-1, top_logp.shape[-1]), rest.reshape(-1)]
    return _over_chunks(_topk_sums, student, labels, head, per_position, temperature)


def _over_chunks(sums, student: torch.Tensor, labels: torch.Tensor, head: nn.Module, teacher_parts: list, *args):
    """`sums(student states, *teacher parts, targets, head, *args)` added over chunks of positions, each
    under activation checkpointing (one chunk's logits exist at a time), divided by the labelled count."""
    s_states = student[:, :-1].reshape(-1, student.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    counted = (targets != -100).sum()
    chunk = max(MIN_CHUNK, CHUNK_ELEMENTS // (2 * head.weight.shape[0]))
    total = student.new_zeros(2, dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(sums, s_states[part], *(t[part] for t in teacher_parts), targets[part], head,
                                   *args, use_reentrant=False)
    return total[0] / counted, total[1] / counted


def _student_terms(s_states, targets, head):
    """The student's logits (fp32) and their log-normaliser, and the chunk's summed cross-entropy."""
    valid = targets != -100
    logits = head(s_states).float()
    log_norm = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logits, log_norm, ((log_norm - picked) * valid).sum(), valid


def _distill_sums(s_states, t_states, targets, student_head, teacher_head, temperature):
    """[sum of cross-entropy, sum of KL] over one chunk's labelled positions."""
    logits, log_norm, cross_entropy, valid = _student_terms(s_states, targets, student_head)
    with torch.no_grad():  # the teacher's side: constants of the student's gradient
        teacher_logp = teacher_head(t_states).float().div_(temperature).log_softmax(dim=-1)
        teacher_p = teacher_logp.exp()
        teacher_neg_entropy = (teacher_p * teacher_logp).sum(dim=-1)
        del teacher_logp
    scaled = logits if temperature == 1.0 else logits / temperature
    scaled_norm = log_norm if temperature == 1.0 else torch.logsumexp(scaled, dim=-1)
    # KL(p ‖ q) = Σ p log p − Σ p log q, with log q = scaled − logsumexp(scaled)
    kl = (teacher_neg_entropy - (teacher_p * scaled).sum(dim=-1) + scaled_norm) * valid
    return torch.stack([cross_entropy, kl.sum()])


def _topk_sums(s_states, t_ids, t_logp, t_rest, targets, head, temperature):
    """[sum of cross-entropy, sum of KL over the k + 1 outcomes] over one chunk's labelled positions."""
    logits, log_norm, cross_entropy, valid = _student_terms(s_states, targets, head)
    scaled = logits if temperature == 1.0 else logits / temperature
    scaled_norm = log_norm if temperature == 1.0 else torch.logsumexp(scaled, dim=-1)
    student_logq = scaled.gather(-1, t_ids) - scaled_norm.unsqueeze(-1)
    kl = (t_logp.exp() * (t_logp - student_logq)).sum(dim=-1)
    if t_ids.shape[-1] < logits.shape[-1]:  # the rest of the vocabulary: one outcome of the k + 1
        student_rest = scaled.scatter(-1, t_ids, float("-inf")).logsumexp(dim=-1) - scaled_norm
        kl = kl + t_rest.exp() * (t_rest - student_rest)
    return torch.stack([cross_entropy, (kl * valid).sum()])


def source_teacher(model_spec: str, *, dtype: str, device: str, quant: str | None = None) -> tuple[ModelTeacher, int]:
    """The unpruned source loaded a second time as a frozen teacher, and the bytes that copy holds."""
    from ..models import load_model

    source, _ = load_model(model_spec, dtype=dtype, device=device, quant=quant)
    held = sum(t.numel() * t.element_size() for t in (*source.parameters(), *source.buffers()))
    return ModelTeacher(source), held


def model_teacher(spec: str, settings: DistillSettings, blocks: torch.Tensor, *, dtype: str, accelerator,
                  seq_len: int, batch_size: int, log, quant: str | None = None
                  ) -> tuple[ModelTeacher | CachedTeacher, dict]:
    """The teacher `spec` for training on `blocks` against a model other than the one trained: its
    cache when settings.cache names one (built first if need be), else the model loaded a second time;
    and what the record says of it (`training.distill`: the teacher, how it was held, its bytes)."""
    if settings.cache:
        key = CacheKey(teacher=spec, top_k=settings.top_k, temperature=settings.temperature, seq_len=seq_len,
                       quant=quant)
        teacher, info = cached_source_teacher(spec, Path(settings.cache), blocks, key, dtype=dtype,
                                              accelerator=accelerator, batch_size=batch_size, log=log)
        return teacher, {"teacher": spec, "held_as": "its top-k cached", "teacher_model_bytes": None,
                         "teacher_cache": info}
    teacher, held = source_teacher(spec, dtype=dtype, device=str(accelerator.device), quant=quant)
    log(f"distilling from {spec} (a second model: {held / 2**20:,.0f} MiB)")
    return teacher, {"teacher": spec, "held_as": "a second copy", "teacher_model_bytes": held}


def self_held(spec: str, adapters: bool) -> dict:
    """What the record says of a teacher that is the trained model itself (`training.distill`, as
    `model_teacher`'s): the source it was loaded from, how it was held, and no memory of its own."""
    how = "the trained model, its masks off" + (" (adapters on)" if adapters else " and its adapters off")
    return {"teacher": spec, "held_as": how, "teacher_model_bytes": 0}


def self_teacher_for(model: nn.Module, masks_off, settings: DistillSettings) -> SelfTeacher:
    """The LoRAPrune teacher: `model` must carry its LoRA through PEFT (`disable_adapter`)."""
    if settings.cache:
        raise SettingError("DistillSettings.cache", "the teacher here is the model itself with its masks (and "
                           "adapters) off, which costs no memory: leave DistillSettings.cache unset")
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the self-teacher needs a PEFT model (adapters to disable)")
    return SelfTeacher(model, masks_off, adapters=settings.teacher == "tuned")
