"""The one training loop every method uses, on accelerate.

One process by default; `accelerate launch` runs it data-parallel: DDP (every process holds the
whole model), or FSDP2 with an FSDP config (parameters, gradients and optimizer state sharded across
the processes, one unit per decoder layer; sharding.py). AdamW, cosine schedule with linear warm-up,
gradient accumulation, clipping, bf16 autocast on a GPU and fp32 on the CPU, optional gradient
checkpointing.

Data order is a pure function of (seed, step): the blocks are shuffled once per epoch by a seeded
generator, step s takes the next global batch (batch_size x processes x accumulation rows), and
process p takes its own slice of each micro-batch. So one process with batch 2b and two processes
with batch b see the same rows, and a resumed run continues exactly where it stopped.

A method plugs in through `TrainHooks`: `extra_loss` adds a term to every micro-batch's loss (Sheared-
LLaMA's Lagrangian), `before_optimizer_step` sees the synchronised, unclipped gradients of the step
(where LoRAPrune scores units), `log_entry` adds fields to the step's history entry, and
`state_dict`/`load_state_dict` put its state (masks, moving averages, domain weights) into the
checkpoint beside the adapter, the optimizer, the schedule and the random generators. A method may
also choose the rows of each batch (`train(..., sampler=...)`, dynamic batch loading).
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SettingError, UserError
from .tensor_memory import TensorMemory, module_tensors, optimizer_tensors
from .loss import ChunkedLoss
from ..progress import track
from .sharding import gather_to_main, is_fsdp, load_sharded, meta_twin, save_sharded, state_bytes

CHECKPOINT_NAME = "checkpoint"
MEMORY_STEPS = 2  # CPU: count tensor memory over the first two steps, where the peak is reached (see train)
SHARDS = "shards"  # under FSDP: each process's shards of the weights and optimizer state (torch.distributed.checkpoint)
TENSOR_MEMORY_KIND = "peak live tensor memory (CPU; weights, activations, gradients, optimizer state)"


@dataclass
class TrainSettings:
    steps: int = 100
    batch_size: int = 4  # sequences per process per micro-batch
    grad_accum: int = 1
    seq_len: int = 256
    lr: float | None = None  # None: the method's measured rate (training/rates.py), decided by its Run
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    seed: int = 0

    def check(self) -> None:
        for name, least in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 2)):
            if getattr(self, name) < least:
                raise SettingError(f"TrainSettings.{name}",
                                   f"TrainSettings.{name} must be at least {least}, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise SettingError("TrainSettings.lr", f"TrainSettings.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise SettingError("TrainSettings.warmup",
                               f"TrainSettings.warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            name = "weight_decay" if self.weight_decay < 0 else "max_grad_norm"
            raise SettingError(f"TrainSettings.{name}",
                               f"TrainSettings.{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise SettingError("TrainSettings.checkpoint_every", "TrainSettings.checkpoint_every must be 0 (off) "
                               f"or positive, got {self.checkpoint_every}")


class TrainHooks:
    """What a method may do inside the loop; the defaults do nothing."""

    def extra_loss(self, step: int) -> torch.Tensor | None:
        """A term added to the language-model loss of every micro-batch of step `step`."""
        return None

    def before_optimizer_step(self, step: int) -> None:
        """Gradients of step `step` (0-based) are synchronised and not yet clipped or applied."""

    def after_optimizer_step(self, step: int) -> None:
        pass

    def log_entry(self, step: int) -> dict:
        """Fields added to the history entry of step `step` (after its optimizer step)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ComposedHooks(TrainHooks):
    """Several methods' hooks in one loop (shearing with dynamic batch loading), called in order."""

    def __init__(self, *hooks: TrainHooks):
        self.hooks = [h for h in hooks if h is not None]

    def extra_loss(self, step: int) -> torch.Tensor | None:
        terms = [t for t in (h.extra_loss(step) for h in self.hooks) if t is not None]
        return sum(terms) if terms else None

    def before_optimizer_step(self, step: int) -> None:
        for h in self.hooks:
            h.before_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        for h in self.hooks:
            h.after_optimizer_step(step)

    def log_entry(self, step: int) -> dict:
        entry: dict = {}
        for h in self.hooks:
            entry.update(h.log_entry(step))
        return entry

    def state_dict(self) -> dict:
        return {str(i): h.state_dict() for i, h in enumerate(self.hooks)}

    def load_state_dict(self, state: dict) -> None:
        for i, h in enumerate(self.hooks):
            h.load_state_dict(state[str(i)])


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one entry per step: step, loss, lr
    seconds: float = 0.0  # training time, the steps before a resume included
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    peak_rss_bytes: int | None = None  # CPU: the process's resident set, beside the tensor peak
    resumed_from_step: int = 0
    distill: dict | None = None  # with a teacher: its settings and what its passes cost
    processes: dict | None = None  # several processes: how they ran, each one's peak and held state
    held_bytes: dict | None = None  # this process's parameters, gradients and optimizer state at the end
    memory_counted_steps: int | None = None  # CPU: the tensor peak is over this many first steps (None: all)
    # The trained model to use afterwards: the unwrapped model, or under FSDP a plain model with the
    # gathered weights on the main process and None on the others.
    model: nn.Module | None = field(default=None, repr=False)

    def record(self, settings: TrainSettings) -> dict:
        """The `training` entry of a run's prunetune.json."""
        return {
            "settings": asdict(settings),
            "history": self.history,
            "seconds": round(self.seconds, 1),
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "peak_rss_bytes": self.peak_rss_bytes,
            "memory_counted_steps": self.memory_counted_steps,
            "resumed_from_step": self.resumed_from_step,
        } | ({"distill": self.distill} if self.distill else {}) | (
            {"processes": self.processes} if self.processes else {})


def make_accelerator(settings: TrainSettings):
    from accelerate import Accelerator

    from .sharding import enable_on_cpu

    on_gpu = torch.cuda.is_available()
    # cpu=True lets several CPU processes (torchrun / `accelerate launch --multi_gpu` on a machine
    # without GPUs) form a gloo process group instead of each training alone.
    accelerator = Accelerator(mixed_precision="bf16" if on_gpu else "no", cpu=not on_gpu,
                              gradient_accumulation_steps=settings.grad_accum)
    enable_on_cpu(accelerator)
    return accelerator


class BlockSampler:
    """Which rows of the block tensor a process uses for a given step and micro-batch."""

    def __init__(self, num_blocks: int, settings: TrainSettings, num_processes: int, process_index: int):
        self.n = num_blocks
        self.settings = settings
        self.world = num_processes
        self.rank = process_index
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.settings.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm

    def rows(self, step: int, micro: int) -> torch.Tensor:
        b = self.settings.batch_size
        start = (step * self.settings.grad_accum + micro) * b * self.world + self.rank * b
        flat = torch.arange(start, start + b)
        return torch.stack([self._permutation(int(i) // self.n)[int(i) % self.n] for i in flat])


def step_seed(seed: int, process_index: int, step: int) -> int:
    return (seed * 1_000_003 + process_index * 10_007 + step) % (2 ** 63)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reset_peak_memory() -> bool:
    """Start measuring the training's own peak: CUDA's counter, or the process's RSS high-water mark
    (Linux), so loading the model earlier (a GGUF de-quantizes through big temporaries) is not counted."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    import gc

    from ..measure import malloc_trim, reset_peak_rss

    gc.collect()
    malloc_trim()  # hand memory freed after loading back to the OS, so it is not counted as training's
    return reset_peak_rss()


def peak_memory(reset_worked: bool = False) -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    if reset_worked:
        from ..measure import peak_rss_bytes

        return peak_rss_bytes(), "peak RSS during training"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing, non-reentrant, with the embeddings' output requiring grad
    so a frozen base still passes gradients through to the adapters."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def disable_checkpointing(model: nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def train(model: nn.Module, blocks: torch.Tensor, loss_mask: torch.Tensor, settings: TrainSettings, *,
          hooks: TrainHooks | None = None, accelerator=None, checkpoint_dir: Path | None = None,
          resume: bool = False, stop_after: int | None = None, progress: bool = True, log=None,
          sampler=None, teacher=None, distill=None, memory_steps: int | None = MEMORY_STEPS) -> TrainResult:
    """Train the parameters of `model` that require grad for `settings.steps` optimizer steps.

    `sampler` (with `rows(step, micro)`) picks each micro-batch's rows of `blocks`; by default a
    `BlockSampler`. A sampler with state keeps it in the hooks' state so a resumed run continues it.

    With a `teacher` (distill.py) and `distill` settings the objective is the distillation loss; the
    history's `loss` stays the language-model loss, with `distill_loss` beside it.

    `checkpoint_dir/checkpoint` holds the latest checkpoint; with `resume` the run continues from it.
    `stop_after` ends the run early after that many steps (as if killed; used by tests).

    On the CPU the peak tensor memory is counted over the first `memory_steps` steps of the run (None:
    every step; 0: none, and the peak is the resident set's). Counting every tensor costs time (a
    LoRAPrune step took 1.44x as long), and the peak
    is reached by then: the first step creates AdamW's state and the second runs with all of it, and
    every later step repeats the second one's allocations (tests/training/test_train_memory.py checks that the peak
    over every step is the same).
    """
    from transformers import get_cosine_schedule_with_warmup

    settings.check()
    if settings.lr is None:
        raise SettingError("TrainSettings.lr", "TrainSettings.lr is unset: name a learning rate (training/rates.py: "
                           "LORA_LR for an adapter, FULL_LR for every weight), or train through a Run, which sets "
                           "its method's")
    hooks = hooks or TrainHooks()
    accelerator = accelerator or make_accelerator(settings)
    if len(blocks) < settings.batch_size * accelerator.num_processes:
        raise UserError(f"the training data has {len(blocks)} blocks of {blocks.shape[1]} tokens, fewer than one "
                        f"batch of {settings.batch_size * accelerator.num_processes}; use more data or a smaller "
                        "TrainSettings.batch_size")
    torch.manual_seed(settings.seed + accelerator.process_index)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    sharded = is_fsdp(accelerator)
    twin = meta_twin(model) if sharded and accelerator.is_main_process else None
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(settings.warmup * settings.steps), settings.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with their shards
    sampler = sampler or BlockSampler(len(blocks), settings, accelerator.num_processes, accelerator.process_index)
    result = TrainResult()
    start_step = 0
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if resume:
        if checkpoint is None or not (checkpoint / "state.pt").exists():
            raise UserError(f"RunOptions.resume: no checkpoint in '{checkpoint_dir}'")
        start_step = _load_checkpoint(checkpoint, model if sharded else accelerator.unwrap_model(model), optimizer,
                                      scheduler, hooks, result, sharded)
        result.resumed_from_step = start_step
    measuring = reset_peak_memory()
    # a second model as teacher holds its weights through the whole run: they count, as on a GPU
    teacher_tensors = teacher.held_tensors() if teacher is not None else []
    tensor_memory = None if torch.cuda.is_available() or memory_steps == 0 else TensorMemory(
        module_tensors(accelerator.unwrap_model(model)) + optimizer_tensors(optimizer) + teacher_tensors)
    if teacher is not None:
        from .distill import DistillLoss

        objective = DistillLoss(model, teacher, distill)
    else:
        objective = ChunkedLoss(model)
    model.train()
    started = time.perf_counter()
    earlier = result.seconds  # a resumed run's time before its checkpoint
    end = settings.steps if stop_after is None else min(settings.steps, stop_after)
    steps = range(start_step, end)
    counting = tensor_memory is not None and len(steps) > 0
    if counting:
        tensor_memory.__enter__()
    try:
        for step in track(steps, len(steps), "training", enabled=progress and accelerator.is_main_process):
            # dropout's draws depend on (seed, process, step) alone: a resumed run, in every process,
            # continues exactly as the uninterrupted one (checkpoints hold only the main process's state)
            torch.manual_seed(step_seed(settings.seed, accelerator.process_index, step))
            term_sums: dict[str, torch.Tensor] = {}
            for micro in range(settings.grad_accum):
                rows = sampler.rows(step, micro)
                ids = blocks[rows].to(accelerator.device)
                labels = ids.masked_fill(~loss_mask[rows].to(accelerator.device), -100)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = objective(ids, labels)
                        extra = hooks.extra_loss(step)
                    accelerator.backward(loss if extra is None else loss + extra)
                for name, value in objective.terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value
            hooks.before_optimizer_step(step)
            if settings.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            hooks.after_optimizer_step(step)
            means = {name: accelerator.reduce(total / settings.grad_accum, reduction="mean").item()
                     for name, total in term_sums.items()}
            mean_loss = means.pop("lm")
            result.history.append({"step": step + 1, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
                                  | {f"{name}_loss": value for name, value in means.items()}
                                  | hooks.log_entry(step))
            if log and accelerator.is_main_process and ((step + 1) % 10 == 0 or step + 1 == settings.steps):
                log(f"step {step + 1}/{settings.steps}: loss {mean_loss:.4f}")
            if checkpoint and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0:
                result.seconds = earlier + time.perf_counter() - started
                _save_checkpoint(checkpoint, accelerator, model, optimizer, scheduler, hooks, step + 1, result)
            if counting and memory_steps is not None and step + 1 - start_step >= memory_steps:
                tensor_memory.__exit__(None, None, None)
                counting = False
                result.memory_counted_steps = memory_steps
    finally:
        if counting:
            tensor_memory.__exit__(None, None, None)
    result.seconds = earlier + time.perf_counter() - started
    if teacher is not None:
        result.distill = objective.record(len(steps))
    result.peak_memory_bytes, result.peak_memory_kind = peak_memory(measuring)
    if tensor_memory is not None:  # the measure comparable to a GPU's; the resident set stays on record
        result.peak_rss_bytes = result.peak_memory_bytes
        result.peak_memory_bytes, result.peak_memory_kind = tensor_memory.peak, TENSOR_MEMORY_KIND
    result.held_bytes = state_bytes(model, optimizer)
    if accelerator.num_processes > 1:
        result.processes = _per_process(accelerator, result.peak_memory_bytes, result.held_bytes)
        result.peak_memory_bytes = max(result.processes["peak_memory_bytes"])
    model.eval()
    if settings.gradient_checkpointing:
        disable_checkpointing(accelerator.unwrap_model(model))
    result.model = gather_to_main(accelerator, model, twin) if sharded else accelerator.unwrap_model(model)
    return result


def _per_process(accelerator, peak: int, held: dict[str, int]) -> dict:
    """Every process's training peak and the state it holds (parameters, gradients, optimizer), in
    process order, so that what sharding saves shows in the run record."""
    gathered: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, {"peak": peak, "held": held})
    return {"count": accelerator.num_processes, "mode": str(accelerator.distributed_type.value).lower(),
            "peak_memory_bytes": [g["peak"] for g in gathered],
            "state_bytes": [g["held"] for g in gathered]}


def _save_checkpoint(path: Path, accelerator, model, optimizer, scheduler, hooks, step, result) -> None:
    """Write the checkpoint beside the old one and swap it in, so a kill never leaves half of one.
    Under FSDP every process writes its own shards of the weights and the optimizer state (`shards/`)."""
    accelerator.wait_for_everyone()
    hooks_state = hooks.state_dict()  # every process computes it (masks are the same everywhere)
    sharded = is_fsdp(accelerator)
    tmp = path.parent / f".{path.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded:
        save_sharded(tmp / SHARDS, model, optimizer)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        torch.save({
            "step": step,
            "sharded": sharded,
            "trainable": {} if sharded else {n: p.detach().cpu() for n, p in unwrapped.named_parameters()
                                            if p.requires_grad},
            "optimizer": None if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "hooks": hooks_state,
            "history": result.history,
            "seconds": result.seconds,
            "rng": _rng_state(),
        }, tmp / "state.pt")
        old = path.parent / f".{path.name}.old"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, model, optimizer, scheduler, hooks, result, sharded: bool) -> int:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state.get("sharded", False) != sharded:
        saved, now = ("FSDP" if s else "one process or DDP" for s in (state.get("sharded", False), sharded))
        raise UserError(f"the checkpoint in '{path}' was written under {saved}; resume it under {saved}, not {now}")
    if sharded:
        load_sharded(path / SHARDS, model, optimizer)
    else:
        named = dict(model.named_parameters())
        missing = [n for n in state["trainable"] if n not in named]
        if missing:
            raise UserError(f"the checkpoint in '{path}' does not match this model (no parameter {missing[0]})")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    hooks.load_state_dict(state["hooks"])
    result.history = list(state["history"])
    result.seconds = float(state.get("seconds", 0.0))  # a checkpoint written before this was kept counts 0
    _set_rng_state(state["rng"])
    return int(state["step"])
