"""One-shot pruning of a mixture of experts: how a budget is shared between whole experts, the
channels inside the experts and attention heads.

The rule, measured rather than assumed (as for depth against width): every number k of experts
removed from each layer, from 0 up to what the ratio allows (a layer always keeps its router's top-k),
is a candidate. The rest of the budget is cut from the width units among `units`: the same fraction
of the attention heads (by the usual allocation) and of the remaining experts' channels, the
channels taking up whatever the heads' rounding left. The candidate whose masked model has the lowest
loss on the calibration batches wins, and the record keeps every candidate's loss. With `experts`
alone, k is the count whose parameters come closest to the ratio.

Which experts go in a layer: those no calibration token was routed to, then the lowest-scoring;
which channels an expert keeps: its best-scoring ones (structure/experts.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SettingError
from ..structure.allocate import achieved_ratio, round_count, select_masks
from ..structure.experts import Routing, expert_masks
from ..structure.masks import Masks
from ..structure.scores import LayerScores
from ..structure.units import Structure
from .depth_width import lowest_loss

RULE = ("every count of experts removed per layer is a candidate; the rest of the budget takes the same fraction of "
        "attention heads and expert channels; the lowest calibration loss wins")


def expert_counts(structure: Structure, ratio: float, layers: list[int], units: tuple[str, ...]) -> list[int]:
    """The numbers of experts removed per layer worth trying."""
    if "experts" not in units:
        return [0]
    shape = structure.layers[layers[0]]
    per_count = len(layers) * structure.expert_params(shape.intermediate)
    target = ratio * structure.prunable_params(layers, units)
    most = shape.experts - structure.top_k
    if len(units) == 1:  # experts alone: the nearest count, at least one
        return [min(range(1, most + 1), key=lambda k: abs(k * per_count - target))] if most >= 1 else []
    return [k for k in range(most + 1) if k * per_count <= target]


def width_masks(structure: Structure, scores: list[LayerScores], routing: Routing | None, ratio: float,
                layers: list[int], units: tuple[str, ...], removed: int, head_unit: str, round_to: int | str,
                allocation: str, split: str) -> tuple[Masks, dict] | None:
    """`removed` experts out of every layer, and the rest of the budget from heads and expert channels
    (None: the width units cannot give that much)."""
    shape = structure.layers[layers[0]]
    rest = ratio * structure.prunable_params(layers, units) - removed * len(layers) * structure.expert_params(
        shape.intermediate)
    heads_total = structure.prunable_params(layers, ("heads",)) if "heads" in units else 0
    channel_cost = len(layers) * (shape.experts - removed) * structure.params_per_channel  # one channel of every expert
    channels_total = shape.intermediate * channel_cost if "expert-channels" in units else 0
    if not heads_total and not channels_total:
        rest = 0.0  # experts alone: the count was chosen nearest to the ratio
    fraction = max(rest, 0.0) / (heads_total + channels_total) if heads_total + channels_total else 0.0
    if fraction >= 1.0:
        return None
    masks = Masks()
    if heads_total and fraction > 1e-9:
        masks = select_masks(structure, scores, fraction, layers, ("heads",), head_unit, round_to, allocation, split)
    heads_removed = achieved_ratio(structure, masks, layers, ("heads",)) * heads_total if heads_total else 0.0
    width = shape.intermediate
    if channels_total and rest - heads_removed > 0:
        width = shape.intermediate - (rest - heads_removed) / channel_cost
        if width < 1:
            return None
        width = round_count(width, round_to, shape.intermediate)
    masks.experts, masks.expert_channels = expert_masks(structure, scores, routing, layers, removed, width)
    return masks, {"experts_removed_per_layer": removed, "expert_width": width,
                   "head_fraction": round(fraction if heads_total else 0.0, 4)}


def expert_candidates(structure: Structure, scores: list[LayerScores], routing: Routing | None, ratio: float,
                      layers: list[int], units: tuple[str, ...], head_unit: str, round_to: int | str, allocation: str,
                      split: str) -> list[dict]:
    """One candidate per number of experts removed per layer: its masks, its achieved ratio and the
    fields the record keeps; a one-line error when the ratio leaves none."""
    candidates = []
    for removed in expert_counts(structure, ratio, layers, units):
        found = width_masks(structure, scores, routing, ratio, layers, units, removed, head_unit, round_to, allocation,
                            split)
        if found is not None:
            masks, fields = found
            candidates.append(fields | {"ratio": round(achieved_ratio(structure, masks, layers, units), 4),
                                        "masks": masks})
    if not candidates:
        raise SettingError("PruneSettings.ratio", f"no share of a {ratio} cut between {', '.join(units)} keeps every "
                           f"layer {structure.top_k} experts (its router's top-k) and every expert a channel; lower "
                           "PruneSettings.ratio or add unit kinds to PruneSettings.units")
    return candidates


def budget_record(rule: str, candidates: list[dict], best: dict) -> dict:
    """What prunetune.json keeps of the choice: the rule, every candidate (without its masks), the winner."""
    return {"rule": rule, "candidates": [{k: v for k, v in c.items() if k != "masks"} for c in candidates],
            "experts_removed_per_layer": best["experts_removed_per_layer"], "expert_width": best["expert_width"]}


def select_with_experts(model: nn.Module, structure: Structure, scores: list[LayerScores], routing: Routing | None,
                        batches: list[torch.Tensor], ratio: float, layers: list[int], units: tuple[str, ...],
                        head_unit: str, round_to: int | str, allocation: str, split: str,
                        log: Callable[[str], None] = print) -> tuple[Masks, dict]:
    """The masks, and what the record says of the choice: every candidate and its calibration loss."""
    candidates = expert_candidates(structure, scores, routing, ratio, layers, units, head_unit, round_to, allocation,
                                   split)
    best = lowest_loss(model, batches, candidates, lambda c: f"{c['experts_removed_per_layer']} experts per layer "
                       f"removed, experts {c['expert_width']} wide, {c['head_fraction']:.3f} of the heads", log)
    return best["masks"], budget_record(RULE, candidates, best)
