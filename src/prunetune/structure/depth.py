"""Whole decoder layers as a unit (`--units layers`), alone or with heads and channels.

A removed layer takes all of its q, k, v, o, gate, up and down weights with it, so with layers among
the units the prunable parameters of a chosen layer are all of them. Which layers go: those whose
block influence (1 − cos(input, output), importance/layers.py) is lowest, the blocks that turn the
residual stream least.

How a budget is shared between depth and width when both are allowed is measured, not assumed: every
number of removed layers d from 0 up to what the ratio allows is a candidate, the rest of the budget
is cut from the remaining layers' heads and channels by the usual allocation, and the candidate whose
masked model has the lowest loss on the calibration batches wins (methods/prune.py evaluates them).
With layers alone, d is the count whose removed parameters come closest to the ratio.
"""

from __future__ import annotations

import torch

from .allocate import LAYER_UNIT, UNIT_KINDS
from .masks import Masks
from .units import Structure


def width_units(units) -> tuple[str, ...]:
    """The head and channel kinds among `units` (what the width allocation prunes)."""
    return tuple(u for u in units if u != LAYER_UNIT)


def counted_units(units) -> tuple[str, ...]:
    """The kinds whose parameters count as prunable: a whole layer counts every projection."""
    return UNIT_KINDS if LAYER_UNIT in units else tuple(units)


def removal_order(influence: torch.Tensor, layers: list[int]) -> list[int]:
    """The chosen layers, least influential first (ties: the later layer first, as ShortGPT's
    experiments find the deep layers the most redundant)."""
    return sorted(layers, key=lambda i: (float(influence[i]), -i))


def removed_params(structure: Structure, removed: list[int]) -> int:
    return structure.prunable_params(removed, UNIT_KINDS)


def depth_counts(structure: Structure, influence: torch.Tensor, ratio: float, layers: list[int],
                 with_width: bool) -> list[int]:
    """The numbers of layers to try removing. Without width units: the one count whose parameters come
    closest to the target (at least one layer, never every layer). With them: every count whose
    parameters stay within the target, from 0."""
    order = removal_order(influence, layers)
    target = ratio * structure.prunable_params(layers, UNIT_KINDS)
    within = [d for d in range(len(order)) if removed_params(structure, order[:d]) <= target]
    if with_width:
        return within
    most = max(1, min(len(order) - 1, within[-1] + 1))
    candidates = range(1, most + 1)
    return [min(candidates, key=lambda d: (abs(removed_params(structure, order[:d]) - target), d))]


def layer_mask(structure: Structure, removed: list[int]) -> torch.Tensor | None:
    if not removed:
        return None
    keep = torch.ones(structure.num_layers, dtype=torch.bool)
    keep[removed] = False
    return keep


def remaining_ratio(structure: Structure, ratio: float, layers: list[int], removed: list[int], width) -> float:
    """The share of the remaining layers' width-prunable parameters still to remove once `removed` are gone."""
    target = ratio * structure.prunable_params(layers, UNIT_KINDS)
    left = [i for i in layers if i not in removed]
    available = structure.prunable_params(left, width)
    return (target - removed_params(structure, removed)) / available if available else 0.0


def combine(width: Masks, structure: Structure, removed: list[int]) -> Masks:
    """`width` with the `removed` layers taken out whole (their head and channel masks dropped)."""
    return Masks(heads={i: m for i, m in width.heads.items() if i not in removed},
                 channels={i: m for i, m in width.channels.items() if i not in removed},
                 hidden=width.hidden, layers=layer_mask(structure, removed))


def depth_plans(structure: Structure, layer_scores: torch.Tensor, ratio: float, layers: list[int],
                width: tuple[str, ...]) -> list[tuple[list[int], float]]:
    """Every depth/width candidate the ratio allows: the layers removed (the lowest `layer_scores` first)
    and the share of the remaining layers' width units still to cut; a candidate whose remaining layers
    cannot give that much width is left out. How the winner is picked is the method's business."""
    order = removal_order(layer_scores, layers)
    plans = []
    for count in depth_counts(structure, layer_scores, ratio, layers, with_width=bool(width)):
        removed = sorted(order[:count])
        rest = remaining_ratio(structure, ratio, layers, removed, width) if width else 0.0
        if rest < 1.0:
            plans.append((removed, rest))
    return plans
