"""The measured side of the planner's check: the same method really run on random weights.

`measure_method(config, settings)` builds the model of `config` with random weights on the CPU (or
the GPU), sets it up as the method does, and returns the peak the project's own code measures:
`train()`'s record for training steps (tensor memory over its first steps on the CPU,
`torch.cuda.max_memory_allocated` on a GPU), the same count around Taylor's scoring pass. A
quantized base goes through `load_model(quant=...)`, as a user's does, from a saved directory.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from .planner import PlanSettings

BLOCKS = 16  # random training blocks: enough for two steps at any planned batch


def _model(config, settings: PlanSettings, device: torch.device, pruned: bool | dict, quant: str | None,
           tmp: Path) -> nn.Module:
    """`pruned`: to the planner's pruned shape (True), or to one of a mixture's `expert_shapes` (a dict)."""
    from ..bench.shapes import placeholder_tokenizer, random_model
    from ..families import family_of
    from ..models import load_model
    from .planner import cut_to_expert_shape, pruned_shape

    dtype = getattr(torch, settings.dtype)
    model = random_model(copy.deepcopy(config), device, dtype)  # a copy: cutting the model changes its config
    if isinstance(pruned, dict):
        cut_to_expert_shape(model, pruned)
    elif pruned:
        pruned_shape(model, settings.ratio, settings.layer_spec)
    if not quant:
        return model
    family_of(model).join_fused(model)  # written in the family's layout, as load_model expects
    model.save_pretrained(tmp / "model")
    placeholder_tokenizer(config.vocab_size).save_pretrained(tmp / "model")
    del model
    return load_model(str(tmp / "model"), dtype=settings.dtype, device=str(device), quant=quant)[0]


def measure_method(config, settings: PlanSettings, device: str = "cpu") -> dict:
    """{step name: measured peak bytes} for the steps `plan_method` plans (one process)."""
    from ..training.distill import DistillSettings, self_teacher_for
    from ..training.lora import LoraSettings, add_lora
    from ..methods.loraprune.pruner import LoRAPruneSettings, LoRAPruner
    from ..structure.allocate import parse_layers, parse_units
    from ..structure.units import Structure
    from ..training.loop import TrainSettings, train
    from ..families import family_of
    from .planner import expert_shapes

    settings.check()
    device = torch.device(device)
    training = TrainSettings(steps=2, batch_size=settings.batch_size, seq_len=settings.seq_len, lr=1e-4,  # any
                             gradient_checkpointing=settings.gradient_checkpointing)
    blocks = torch.randint(0, config.vocab_size, (BLOCKS * settings.batch_size, settings.seq_len),
                           generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(blocks, dtype=torch.bool)
    lora = LoraSettings(r=settings.lora_r, alpha=2 * settings.lora_r, dtype=settings.lora_dtype)
    method = settings.method
    mixture = family_of(config).moe is not None
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        if method == "taylor":
            measured["scoring"] = _taylor_scoring_peak(_model(config, settings, device, False, None, Path(tmp)),
                                                       blocks[: settings.batch_size].to(device))
        pruned = method in ("loram", "qloram", "taylor")
        if pruned and mixture:  # the largest of the shapes prune chooses among
            shapes = expert_shapes(_model(config, settings, torch.device("meta"), False, None, Path(tmp)),
                                   settings.ratio)  # (the tiny models measured have at most PLANNED_SHAPES)
            measured["recovery"] = max(_recovery_peak(config, settings, device, shape, blocks, mask, lora, training,
                                                      Path(tmp)) for shape in shapes)
            return measured
        model = _model(config, settings, device, pruned, settings.base_quant, Path(tmp))
        hooks = teacher = None
        if method in ("train", "shear"):
            model.requires_grad_(True)
        else:
            torch.manual_seed(0)
            model = add_lora(model, lora, experts=mixture and method == "loraprune")
        distill = DistillSettings(enabled=settings.distilled)
        if method == "loraprune":
            structure = Structure.of(model)
            units = parse_units(family_of(model).default_units)  # what `prune` removes by default
            hooks = LoRAPruner(model, structure, ratio=settings.ratio,
                               layers=parse_layers("all" if mixture else "paper", structure.num_layers), units=units,
                               head_unit="kv-group", round_to=1, allocation="uniform",
                               settings=LoRAPruneSettings(), total_steps=100)
            if settings.distilled:
                teacher = self_teacher_for(model, hooks.masks_off, distill)
        run = train(model, blocks, mask, training, hooks=hooks, progress=False, teacher=teacher, distill=distill)
        measured["recovery" if method == "taylor" else "training"] = run.peak_memory_bytes
    return measured


def _recovery_peak(config, settings: PlanSettings, device: torch.device, shape: dict, blocks, mask, lora, training,
                   tmp: Path) -> int:
    from ..training.lora import add_lora
    from ..training.loop import train

    model = _model(config, settings, device, shape, None, tmp)
    torch.manual_seed(0)
    return train(add_lora(model, lora), blocks, mask, training, progress=False).peak_memory_bytes


def _taylor_scoring_peak(model: nn.Module, batch: torch.Tensor) -> int:
    from ..training.tensor_memory import TensorMemory, module_tensors
    from ..importance.taylor import taylor_scores

    if batch.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        taylor_scores(model, [batch])
        return torch.cuda.max_memory_allocated()
    with TensorMemory(module_tensors(model)) as memory:
        taylor_scores(model, [batch])
    return memory.peak


def measure_criterion_step(config, variant: str, batch_size: int, seq_len: int, dtype: str = "bfloat16",
                           lora_dtype: str = "float32") -> int:
    """Peak tensor memory (CPU) of one scoring step: `taylor` (every projection weight gets a gradient,
    then |W ⊙ ∂L/∂W| per unit), `lora-guided` (a LoRA's gradients, then LoRAPrune's criterion) or
    `lora-guided-8bit` (the same on an 8-bit base), the adapter in fp32 (PEFT's default) or with
    `lora_dtype="base"` in the weights' dtype. Forward and backward use the model's own loss, as
    LLM-Pruner's criterion does; the weights and the adapter count from the start."""
    from ..training.tensor_memory import TensorMemory, module_tensors
    from ..importance.lora_guided import lora_guided_scores
    from ..training.lora import LoraSettings, add_lora

    settings = PlanSettings(method="lora", batch_size=batch_size, seq_len=seq_len, dtype=dtype)
    batch = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        quant = "8bit" if variant == "lora-guided-8bit" else None
        model = _model(config, settings, torch.device("cpu"), False, quant, Path(tmp))
        if variant == "taylor":
            return _taylor_scoring_peak(model, batch)
        torch.manual_seed(0)
        model = add_lora(model, LoraSettings(dropout=0.0, dtype=lora_dtype))
        with TensorMemory(module_tensors(model)) as memory:
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            lora_guided_scores(model)
        return memory.peak
