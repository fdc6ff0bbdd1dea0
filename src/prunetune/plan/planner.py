"""`prunetune plan`: the peak training memory of a method on a model, from its config alone.

Each plan builds the model on the meta device at the dtypes the run uses, sets it up as the method
does (LoRA, a quantized base, the pruned shapes, LoRAPrune's criterion and self-distillation,
Taylor's weight gradients, full-parameter training) and runs two of its training steps there, the
first creating AdamW's state and the second running with all of it (meta_step.py). The breakdown
comes from the same count: what is held before the step (weights, quantization state, adapters,
optimizer state), the activations the forward keeps for the backward, the gradients, the loss
chunk, the criterion's temporaries, and the peak.

Several processes are modelled from the one-process plan at the per-process batch: DDP adds its
gradient buckets (a second copy of the gradients); FSDP divides the weights, gradients and optimizer
state by the processes and adds the units it gathers whole while they run (the root unit, i.e. the
embeddings, final norm and head, for the whole step; two decoder layers' weights, the next one
prefetched, and one layer's gradients).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import SettingError, UserError
from ..training.loss import CHUNK_ELEMENTS, MIN_CHUNK
from .meta_step import META, meta_memory, planning, quant_state_bytes, quantize_projections

METHODS = ("lora", "loraprune", "taylor", "loram", "qloram", "shear", "train")
# On a mixture of experts: a LoRA (on attention), a one-shot prune by expert with its recovery, and
# continued training; LoRAPrune, LoRAM and the shear refuse mixtures.
MIXTURE_METHODS = ("lora", "loraprune", "taylor", "train")
PLANNED_SHAPES = 5  # a mixture's pruned shapes planned for Taylor's recovery (each is a meta step)
UNIFORM_WHY = "its config holds one expert count and width for every layer"
SHAPE_PREFIX = "shape:"
PLANNED_STEPS = 2  # the first creates AdamW's state, the second runs with all of it (train.MEMORY_STEPS)


@dataclass
class PlanSettings:
    method: str = "lora"
    ratio: float = 0.5  # loram, qloram: the structured ratio of the pruned model; taylor: of its recovery
    quant: str | None = None  # 8bit or nf4 base (qloram: nf4)
    batch_size: int = 4  # per process
    seq_len: int = 256
    gradient_checkpointing: bool = False
    processes: int = 1
    fsdp: bool = False
    dtype: str = "bfloat16"  # the weights' dtype: what `--dtype auto` loads on a GPU
    lora_r: int = 8
    lora_dtype: str = "float32"  # PEFT's default on a bf16 base; "base": the weights' dtype
    distill: bool | None = None  # None: on for loraprune (prunetune's default), off otherwise
    # the pruned layers of loram / qloram / taylor's recovery; None: as those commands prune by
    # default (paper for LoRAM's stru, all for prune's one-shot taylor)
    layers: str | None = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise SettingError("PlanSettings.method", f"unknown PlanSettings.method '{self.method}'; use "
                               f"{', '.join(METHODS)}")
        if self.quant not in (None, "8bit", "nf4"):
            raise SettingError("PlanSettings.quant", f"unknown PlanSettings.quant '{self.quant}'; use 8bit or nf4")
        if self.quant and self.method in ("taylor", "shear", "train"):
            raise SettingError("PlanSettings.quant", f"PlanSettings.method {self.method} trains or differentiates "
                               "every weight; it takes no PlanSettings.quant")
        if not 0 < self.ratio < 1:
            raise SettingError("PlanSettings.ratio", f"PlanSettings.ratio must be in (0, 1), got {self.ratio}")
        for name, least in (("batch_size", 1), ("seq_len", 2), ("processes", 1), ("lora_r", 1)):
            if getattr(self, name) < least:
                raise SettingError(f"PlanSettings.{name}",
                                   f"PlanSettings.{name} must be at least {least}, got {getattr(self, name)}")
        if self.fsdp and self.processes < 2:
            raise SettingError("PlanSettings.fsdp", "PlanSettings.fsdp needs PlanSettings.processes of at least 2")
        if self.fsdp and (self.quant or self.method == "qloram"):
            raise SettingError("PlanSettings.fsdp", "FSDP shards plain weights; a quantized base runs in one "
                               "process or under DDP")

    @property
    def layer_spec(self) -> str:
        return self.layers or ("all" if self.method == "taylor" else "paper")

    @property
    def base_quant(self) -> str | None:
        return "nf4" if self.method == "qloram" else self.quant

    @property
    def distilled(self) -> bool:
        return self.method == "loraprune" if self.distill is None else self.distill


def resolve_config(spec: str):
    """The config of `shape:NAME` (a named shape), a local directory, a built-in model or a hub id."""
    from ..models import check_architecture, load_config, resolve_model_spec

    if spec.startswith(SHAPE_PREFIX):
        from ..bench.shapes import shape_config

        config = shape_config(spec[len(SHAPE_PREFIX):])
    else:
        config = load_config(resolve_model_spec(spec))
    check_architecture(config)
    return config


def parse_memory(text: str) -> int:
    """'24GiB', '80GB', '20 GiB', '512MiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)\s*", text or "", flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--gpu-memory '{text}': give a size like 24GiB or 80GB")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** ("KMGT".index(unit[0]) + 1))


# ------------------------------------------------------------------------------------------ the model
def _meta_model(config, dtype: torch.dtype) -> nn.Module:
    """A model of `config` on the meta device, built from a copy: a model keeps its config object, and
    cutting the model changes it."""
    from transformers import AutoModelForCausalLM

    from ..families import prepare

    with torch.device(META):
        return prepare(AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype))


def pruned_shape(model: nn.Module, ratio: float, layer_spec: str) -> nn.Module:
    """Cut `model` (meta) to the kept counts uniform allocation gives at `ratio` in `layer_spec`'s layers."""
    from ..structure.scores import LayerScores
    from ..structure.allocate import masks_from_counts, parse_layers, target_counts
    from ..structure.surgery import cut
    from ..structure.units import Structure

    structure = Structure.of(model)
    layers = parse_layers(layer_spec, structure.num_layers)
    counts = target_counts(structure, ratio, layers)
    equal = [LayerScores(torch.ones(s.num_heads), torch.ones(s.num_kv_heads), torch.ones(s.intermediate))
             for s in structure.layers]
    cut(model, masks_from_counts(structure, equal, counts))
    return model


def expert_units(model: nn.Module) -> tuple[str, ...]:
    """The units a mixture of experts is planned with: those `prune` shares a budget between by default."""
    from ..families import family_of
    from ..structure.allocate import parse_units

    return parse_units(family_of(model).default_units)


def expert_shapes(model: nn.Module, ratio: float) -> list[dict]:
    """The shapes `prune` chooses among on a mixture of experts at `ratio` (every layer, uniform): one
    per number of experts removed per layer, the rest of the budget from heads and expert channels, at
    prune's default rounding (methods/expert_budget.py). Which one wins depends on the calibration
    loss, so a plan takes the largest; each is {"masks", "experts_removed_per_layer", "expert_width",
    "head_fraction"}."""
    from ..methods.expert_budget import expert_counts, width_masks
    from ..structure.allocate import DEFAULT_ROUND_TO, DEFAULT_SPLIT
    from ..structure.scores import LayerScores
    from ..structure.units import Structure

    structure = Structure.of(model)
    layers, units = list(range(structure.num_layers)), expert_units(model)
    equal = [LayerScores(torch.ones(s.num_heads), torch.ones(s.num_kv_heads), torch.zeros(0), torch.ones(s.experts),
                         torch.ones(s.experts, s.intermediate)) for s in structure.layers]
    shapes = []
    for removed in expert_counts(structure, ratio, layers, units):
        found = width_masks(structure, equal, None, ratio, layers, units, removed, "kv-group", DEFAULT_ROUND_TO,
                            "uniform", DEFAULT_SPLIT)
        if found is not None:
            shapes.append(found[1] | {"masks": found[0]})
    if not shapes:
        raise SettingError("PlanSettings.ratio", f"no share of a {ratio} cut keeps every layer its router's top-k "
                           "experts and every expert a channel; lower PlanSettings.ratio")
    return shapes


def cut_to_expert_shape(model: nn.Module, shape: dict) -> nn.Module:
    """Cut `model` (a mixture of experts) to one of `expert_shapes`."""
    from ..structure.surgery import cut

    cut(model, shape["masks"])
    return model


def _with_lora(model: nn.Module, settings: PlanSettings, experts: bool = False) -> nn.Module:
    """The adapter prunetune's commands add; with `experts`, LoRAPrune's, on a mixture's experts too."""
    from ..training.lora import LoraSettings, add_lora

    with torch.device(META):
        return add_lora(model, LoraSettings(r=settings.lora_r, alpha=2 * settings.lora_r, dtype=settings.lora_dtype),
                        experts=experts)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------ a step
@dataclass
class StepPlan:
    """One planned step's parts (bytes) and its peak."""

    frozen_weights: int = 0
    quant_state: int = 0
    trainable_weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    loss_chunk: int = 0
    criterion: int = 0
    peak: int = 0
    notes: list[str] = field(default_factory=list)


def plan_training_step(model: nn.Module, settings: PlanSettings, loraprune: bool = False) -> StepPlan:
    """Two training steps of `model` (meta; what requires grad is trained) at the settings' batch."""
    from ..training.distill import DistillLoss, DistillSettings, self_teacher_for
    from ..training.tensor_memory import module_tensors, optimizer_tensors
    from ..training.loss import ChunkedLoss
    from ..training.loop import enable_checkpointing

    params = [p for p in model.parameters() if p.requires_grad]
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if settings.distilled:
        distill = DistillSettings(enabled=True)
        objective = DistillLoss(model, self_teacher_for(model, contextlib.nullcontext, distill), distill)
    else:
        objective = ChunkedLoss(model)
    ids = torch.zeros(settings.batch_size, settings.seq_len, dtype=torch.long, device=META)
    plan = StepPlan()
    memory = meta_memory(module_tensors(model) + optimizer_tensors(optimizer))
    model.train()
    with planning(), memory:
        for _ in range(PLANNED_STEPS):
            before = memory.current
            loss = objective(ids, ids)
            plan.activations = memory.current - before
            loss.backward()
            plan.gradients = _bytes(p.grad for p in params)
            if loraprune:  # LoRAPrune scores every step, after the backward (before the optimizer step)
                held, peak = memory.current, memory.peak
                memory.peak = held
                _criterion_temporaries(model)
                plan.criterion = memory.peak - held
                memory.peak = max(peak, memory.peak)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    plan.peak = memory.peak
    trainable = {id(p) for p in params}
    plan.trainable_weights = _bytes(params)
    plan.quant_state = quant_state_bytes(model)
    plan.frozen_weights = _bytes([p for p in model.parameters() if id(p) not in trainable]
                                 + list(model.buffers())) - plan.quant_state
    plan.optimizer = _bytes(optimizer_tensors(optimizer))
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    chunk = max(MIN_CHUNK, CHUNK_ELEMENTS // (vocab * (2 if settings.distilled else 1)))
    plan.loss_chunk = chunk * vocab * 4 * (2 if settings.distilled else 1)  # fp32 logits of one chunk
    return plan


def _criterion_temporaries(model: nn.Module) -> None:
    """LoRAPrune's criterion as `lora_guided_scores` runs it, projection by projection (a quantized
    weight de-quantized for it) and expert parameter by expert parameter, keeping the per-unit scores
    on the meta device."""
    from ..importance.lora_guided import expert_channel_scores, projection_unit_scores
    from ..training.lora import lora_matrices
    from ..structure.units import expert_adapters
    from ..structure.units import decoder_layers
    from .meta_step import planned_dense_weight

    with torch.no_grad():
        for layer in decoder_layers(model):
            for lora in lora_matrices(layer):
                W = planned_dense_weight(lora.module)
                projection_unit_scores(lora.name, W, lora.A, lora.B, lora.A.grad, lora.B.grad, lora.scaling,
                                       layer.self_attn.head_dim)
                del W
            for wrapper in expert_adapters(layer).values():
                expert_channel_scores(wrapper)


def plan_taylor_scoring(model: nn.Module, settings: PlanSettings) -> StepPlan:
    """Taylor's scoring pass: every projection weight gets a gradient; the loss builds the full logits."""
    from ..training.tensor_memory import module_tensors
    from ..importance.taylor import scored_weights, weight_gradients

    ids = torch.zeros(settings.batch_size, settings.seq_len, dtype=torch.long, device=META)
    weights = scored_weights(model)
    plan = StepPlan()
    memory = meta_memory(module_tensors(model))
    with planning(), memory:
        with weight_gradients(model, [ids]):
            plan.gradients = _bytes(w.grad for w in weights)
            largest = max(weights, key=lambda w: w.numel())
            held = memory.current
            per_weight = (largest.float() * largest.grad.float()).abs()  # one projection's scores at a time
            plan.criterion = memory.current - held
            del per_weight
    plan.peak = max(memory.peak, held + plan.criterion)
    plan.frozen_weights = _bytes(list(model.parameters()) + list(model.buffers()))
    plan.activations = plan.peak - plan.frozen_weights - plan.gradients - plan.criterion
    plan.notes.append("activations: the forward's and the full logits' (the scoring pass uses the model's own loss)")
    return plan


# ------------------------------------------------------------------------------------------ methods
def plan_method(config, settings: PlanSettings) -> dict:
    """The plan of `settings.method` on `config`: its steps' breakdowns and the per-process peak."""
    from ..errors import UserError
    from ..families import BY_MODEL_TYPE

    settings.check()
    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    experts = family is not None and family.moe is not None
    if experts and settings.method not in MIXTURE_METHODS:
        raise UserError(f"{family.name} is a mixture of experts, which {settings.method} does not prune or train; "
                        f"plan {', '.join(MIXTURE_METHODS)} on it")
    if experts and settings.layers not in (None, "all"):
        raise SettingError("PlanSettings.layers", f"{family.name} is pruned in every layer alike ({UNIFORM_WHY}): "
                           "leave PlanSettings.layers at all")
    dtype = getattr(torch, settings.dtype)
    steps: dict[str, StepPlan] = {}
    method = settings.method
    if method == "taylor" and experts:
        steps["scoring"] = plan_taylor_scoring(_meta_model(config, dtype), settings)
        steps["recovery"] = _largest_expert_recovery(config, settings, dtype)
    elif method in ("train", "shear"):
        model = _meta_model(config, dtype)
        model.requires_grad_(True)
        steps["training"] = plan_training_step(model, settings)
        if method == "shear":
            steps["training"].notes.append("the mask logits and multipliers (one value per unit) are left out")
    elif method == "taylor":
        steps["scoring"] = plan_taylor_scoring(_meta_model(config, dtype), settings)
        model = _with_lora(pruned_shape(_meta_model(config, dtype), settings.ratio, settings.layer_spec), settings)
        steps["recovery"] = plan_training_step(model, settings)
    else:  # LoRA on the full model (lora, loraprune) or on the pruned one (loram, qloram)
        model = _meta_model(config, dtype)
        if method in ("loram", "qloram"):
            pruned_shape(model, settings.ratio, settings.layer_spec)
        if settings.base_quant:
            quantize_projections(model, settings.base_quant, dtype)
        model = _with_lora(model, settings, experts=experts and method == "loraprune")
        steps["training"] = plan_training_step(model, settings, loraprune=method == "loraprune")
    per_process = {name: _per_process(step, settings, config) for name, step in steps.items()}
    peak_step = max(per_process, key=lambda name: per_process[name]["peak"])
    return {"method": method, "settings": asdict(settings), "steps": {n: asdict(s) for n, s in steps.items()},
            "per_process": per_process, "peak": per_process[peak_step]["peak"], "peak_step": peak_step,
            "parameters": _parameter_count(config)}


def _largest_expert_recovery(config, settings: PlanSettings, dtype: torch.dtype) -> StepPlan:
    """The recovery of a pruned mixture of experts, planned on the shapes prune may choose; the largest.
    A model with many experts has dozens of shapes (one per number removed), so at most
    PLANNED_SHAPES of them, spread evenly from the fewest experts removed to the most, are planned."""
    shapes = expert_shapes(_meta_model(config, dtype), settings.ratio)
    picked = sorted({round(i * (len(shapes) - 1) / max(PLANNED_SHAPES - 1, 1)) for i in range(PLANNED_SHAPES)})
    plans = []
    for shape in (shapes[i] for i in picked):
        model = _with_lora(cut_to_expert_shape(_meta_model(config, dtype), shape), settings)
        plans.append((plan_training_step(model, settings), shape))
    plan, shape = max(plans, key=lambda found: found[0].peak)
    among = f"{len(plans)} shapes" if len(plans) == len(shapes) else f"{len(plans)} of the {len(shapes)} shapes"
    plan.notes.append(f"the largest of the {among} prune's expert budget chooses among (by calibration loss): "
                      f"experts removed per layer {shape['experts_removed_per_layer']}, expert width "
                      f"{shape['expert_width']}, share of the heads cut {shape['head_fraction']:.3f}")
    return plan


def _parameter_count(config) -> int:
    from ..structure.units import count_parameters

    return count_parameters(_meta_model(config, torch.bfloat16))["total"]


def _per_process(step: StepPlan, settings: PlanSettings, config) -> dict:
    """A step's peak per process under DDP or FSDP, from its one-process plan."""
    if settings.processes == 1:
        return {"peak": step.peak, "mode": "one process"}
    if not settings.fsdp:
        return {"peak": step.peak + step.gradients, "mode": "DDP", "gradient_buckets": step.gradients}
    state = step.frozen_weights + step.trainable_weights + step.optimizer + step.gradients
    sharded = -(-state // settings.processes)
    hidden, vocab = config.hidden_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * config.intermediate_size + 2 * hidden
    root = vocab * hidden * (1 if config.tie_word_embeddings else 2) + hidden
    value = torch.empty(0, dtype=getattr(torch, settings.dtype)).element_size()
    gathered = value * (root + 2 * layer) + (value * (root + layer) if settings.method in ("train", "shear") else 0)
    return {"peak": step.peak - state + sharded + gathered, "mode": f"FSDP on {settings.processes}",
            "sharded_state": sharded, "gathered_units": gathered}
