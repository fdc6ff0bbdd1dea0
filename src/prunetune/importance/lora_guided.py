"""LoRAPrune's criterion: the importance of the frozen weights from LoRA's weights and gradients.

With y = W x + s·B·A x, the gradient the full weight would have is estimated without ever
computing it (LoRAPrune, eq. 6-8 and the official code):

    G = ∂L/∂B·A + B·∂L/∂A − ∂L/∂B·∂L/∂A  =  ∂L/∂B·(A − ∂L/∂A) + B·∂L/∂A
    score(w) = |G ⊙ (W + s·B·A)|   (official code)   or   (G ⊙ (W + s·B·A))²   (paper)

summed over every matrix of a unit. The products are formed a block of rows at a time, so besides
the (de-quantized, if the base is 8-bit or NF4) W itself no weight-sized temporary ever exists, and
the pretrained weights never get a gradient. The official code L2-normalises each module's unit
scores before adding them (`normalize=True`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..training.lora import lora_matrices
from ..structure.units import decoder_layers, dense_weight, expert_adapters, layer_projections, moe_parts, unit_sums
from ..training.sharding import is_sharded, row_slice, sum_across_processes
from ..structure.scores import LayerScores
from .sharded import local_unit_sums

SCORE_KINDS = ("abs", "square")
ROW_BLOCK = 1024  # rows per block: a few MB of temporaries even for the widest MLPs


@torch.no_grad()
def projection_unit_scores(name: str, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor,
                           gB: torch.Tensor, scaling: float, head_dim: int, score: str = "abs") -> torch.Tensor:
    """Unit scores of one projection (one value per head or channel), built block by block."""
    if is_sharded(W):
        return _sharded_unit_scores(name, W, A, B, gA, gB, scaling, head_dim, score)
    A, B, gA, gB = (t.float() for t in (A, B, gA, gB))
    A_minus_gA = A - gA
    rows_per_block = max(head_dim, ROW_BLOCK // head_dim * head_dim)  # blocks hold whole heads
    parts, column_total = [], None
    for start in range(0, W.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        estimate = gB[rows] @ A_minus_gA + B[rows] @ gA  # the gradient W would have, for these rows
        merged = W[rows].float() + scaling * (B[rows] @ A)
        per_weight = (estimate * merged).abs_() if score == "abs" else (estimate * merged).square_()
        if name in ("o_proj", "down_proj"):  # units are columns: accumulate over row blocks
            sums = unit_sums(name, per_weight, head_dim)
            column_total = sums if column_total is None else column_total + sums
        else:
            parts.append(unit_sums(name, per_weight, head_dim))
    return column_total if column_total is not None else torch.cat(parts)


def _sharded_unit_scores(name: str, W, A, B, gA, gB, scaling: float, head_dim: int, score: str) -> torch.Tensor:
    """The same unit scores under FSDP, where each process holds some rows of W, of B and of B's gradient
    (sharding.py). It gathers only A and its gradient (rank x input: the adapter's, small), scores its
    own rows, and sums them into units: the units made of rows (q, k, v heads, gate and up channels)
    from the rows it holds, those made of columns (o heads, down channels) as partial column sums.
    The partial unit sums of all processes then add up to the whole, on every process."""
    W_rows, first = row_slice(W)
    B_rows, gB_rows = row_slice(B)[0].float(), row_slice(gB)[0].float()
    A, gA = A.full_tensor().float(), gA.full_tensor().float()
    A_minus_gA = A - gA
    partial = local_unit_sums(name, W_rows[:0].float(), first, tuple(W.shape), head_dim)  # zeros
    for start in range(0, W_rows.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        estimate = gB_rows[rows] @ A_minus_gA + B_rows[rows] @ gA
        merged = W_rows[rows].float() + scaling * (B_rows[rows] @ A)
        per_weight = (estimate * merged).abs_() if score == "abs" else (estimate * merged).square_()
        partial += local_unit_sums(name, per_weight, first + start, tuple(W.shape), head_dim)
    return sum_across_processes(partial.to(W_rows.device)).cpu()


@torch.no_grad()
def lora_guided_scores(model: nn.Module, batches=None, *, seed: int = 0, score: str = "abs",
                       normalize: bool = True) -> list[LayerScores]:
    """Scores from the gradients already on the LoRA matrices (call after backward)."""
    if score not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}")
    result = []
    for layer in decoder_layers(model):
        head_dim = layer.self_attn.head_dim
        per_module: dict[str, torch.Tensor] = {}
        for lora in lora_matrices(layer):
            if lora.A.grad is None or lora.B.grad is None:
                raise ValueError(f"{lora.name}: LoRA has no gradient; score after backward")
            W = dense_weight(lora.module)
            units = projection_unit_scores(lora.name, W, lora.A, lora.B, lora.A.grad, lora.B.grad,
                                           lora.scaling, head_dim, score).cpu()
            if normalize:
                units = units / units.norm().clamp_min(1e-12)
            per_module[lora.name] = units
            del W
        missing = set(layer_projections(layer)) - set(per_module)
        if missing:
            raise ValueError(f"LoRAPrune needs LoRA on every projection; missing {sorted(missing)}")
        layer_scores = LayerScores.from_projections(per_module)
        if moe_parts(layer) is not None:
            layer_scores = _with_expert_scores(layer_scores, layer, score)
        result.append(layer_scores)
    return result


@torch.no_grad()
def expert_channel_scores(wrapper: nn.Module, score: str = "abs") -> torch.Tensor:
    """[experts, width] scores of one fused expert parameter's channels from its per-expert adapters
    (PEFT's ParamWrapper: A is [experts x r, in], B [out, r x experts]); the same estimate as above,
    one expert at a time. Gate and up rows of `gate_up_proj` both count for their channel, and
    `down_proj`'s columns."""
    (adapter,) = wrapper.active_adapters
    A, B = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
    if A.grad is None or B.grad is None:
        raise ValueError(f"{wrapper.parameter_name}: LoRA has no gradient; score after backward")
    count, scaling, W = wrapper.num_experts, float(wrapper.scaling[adapter]), wrapper.get_param()
    A, gA = (t.float().reshape(count, -1, t.shape[-1]) for t in (A, A.grad))
    B, gB = (t.float().reshape(t.shape[0], -1, count) for t in (B, B.grad))
    channels = []
    for e in range(count):
        estimate = gB[:, :, e] @ (A[e] - gA[e]) + B[:, :, e] @ gA[e]
        merged = W[e].float() + scaling * (B[:, :, e] @ A[e])
        per_weight = (estimate * merged).abs_() if score == "abs" else (estimate * merged).square_()
        if wrapper.parameter_name == "gate_up_proj":  # [2 x width, hidden]: gate rows, then up rows
            rows = per_weight.sum(dim=1)
            channels.append(rows[: len(rows) // 2] + rows[len(rows) // 2:])
        else:  # down_proj [hidden, width]
            channels.append(per_weight.sum(dim=0))
    return torch.stack(channels)


def _with_expert_scores(layer_scores: LayerScores, layer: nn.Module, score: str) -> LayerScores:
    adapters = expert_adapters(layer)
    if set(adapters) != {"gate_up_proj", "down_proj"}:
        raise ValueError("LoRA-guided scores of experts need LoRA on both fused expert parameters "
                         "(add_lora(..., experts=True))")
    channels = sum(expert_channel_scores(wrapper, score) for wrapper in adapters.values()).cpu()
    return LayerScores(layer_scores.q_heads, layer_scores.kv_heads, layer_scores.channels, channels.sum(dim=1),
                       channels)


def lora_guided_one_shot_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *,
                                seed: int = 0) -> list[LayerScores]:
    """LoRAPrune single-shot: a fresh LoRA (seeded) on every projection, the calibration batches'
    gradients on its A and B only, scores from them, and the adapter taken off again unmerged.

    With B = 0 at initialisation ∂L/∂A is zero, so the estimate is ∂L/∂B·A: the weight gradient
    seen through the adapter's random down-projection. Scores are the raw sums (no per-module
    normalisation), first-order estimates on one scale for heads and channels. The frozen weights
    get no gradient, so this runs on 8-bit and NF4 bases. A mixture's experts get a rank-r adapter
    each on the fused parameters, and their channels are scored the same way.
    """
    from ..training.lora import LoraSettings, add_lora
    from ..modeling import eval_mode
    from .calibration import input_device, require_batches

    batches = require_batches(batches, "lora-guided")
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    torch.manual_seed(seed)
    peft_model = add_lora(model, LoraSettings(dropout=0.0), experts=True)  # experts: through PEFT's ParamWrapper
    try:
        device = input_device(peft_model)
        with eval_mode(peft_model), torch.enable_grad():
            for batch in batches:
                batch = batch.to(device)
                peft_model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        return lora_guided_scores(peft_model, normalize=False)
    finally:
        peft_model.unload()  # the original projections back in place, nothing merged
        for p, flag in requires_grad:
            p.requires_grad_(flag)
