"""One-shot pruning with whole layers among the units: which layers go, and how the budget is shared
between depth and width (structure/depth.py has the rule; this runs the model to apply it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SettingError
from ..importance.layers import block_influence
from ..structure.allocate import select_masks
from ..structure.depth import combine, depth_plans
from ..structure.masks import Masks, apply_masks
from ..structure.scores import LayerScores
from ..structure.units import Structure


@torch.no_grad()
def masked_loss(model: nn.Module, batches: list[torch.Tensor], masks: Masks) -> float:
    """Mean next-token loss over the calibration batches with `masks` applied."""
    was_training = model.training
    model.eval()
    with apply_masks(model, masks):
        loss = sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)
    model.train(was_training)
    return loss


def lowest_loss(model: nn.Module, batches: list[torch.Tensor], candidates: list[dict],
                describe: Callable[[dict], str], log: Callable[[str], None]) -> dict:
    """The candidate (a dict with its `masks`) whose masked model has the lowest calibration loss; with
    more than one, each gets its `calibration_loss`, logged after `describe(candidate)`."""
    if len(candidates) > 1:
        for candidate in candidates:
            candidate["calibration_loss"] = masked_loss(model, batches, candidate["masks"])
            log(f"{describe(candidate)}: calibration loss {candidate['calibration_loss']:.4f}")
    return min(candidates, key=lambda c: c.get("calibration_loss", 0.0))


def select_with_depth(model: nn.Module, structure: Structure, scores: list[LayerScores], batches: list[torch.Tensor],
                      ratio: float, layers: list[int], width: tuple[str, ...], head_unit: str, round_to: int | str,
                      allocation: str, split: str, log: Callable[[str], None] = print) -> tuple[Masks, dict]:
    """The masks (some layers removed whole, the rest of the budget from heads and channels) and what the
    record says of the choice: each layer's block influence and every candidate's calibration loss."""
    influence = block_influence(model, batches)
    candidates = []
    for removed, rest in depth_plans(structure, influence, ratio, layers, width):
        masks = Masks()
        if rest > 1e-9:
            left = [i for i in layers if i not in removed]
            masks = select_masks(structure, scores, rest, left, width, head_unit, round_to, allocation, split)
        candidates.append({"layers_removed": removed, "width_ratio": round(rest, 4),
                           "masks": combine(masks, structure, removed)})
    if not candidates:
        raise SettingError("PruneSettings.ratio", f"no number of whole layers leaves a {ratio} cut that the remaining "
                           f"layers' {' and '.join(width)} can give; add heads or channels to PruneSettings.units, or "
                           "lower PruneSettings.ratio")
    best = lowest_loss(model, batches, candidates, lambda c: f"depth {len(c['layers_removed'])} layers + width "
                                                             f"{c['width_ratio']:.3f}", log)
    record = {"layer_score": "block influence, 1 - cos(input, output)",
              "influence": [round(float(v), 6) for v in influence],
              "candidates": [{k: v for k, v in c.items() if k != "masks"} for c in candidates],
              "layers_removed": best["layers_removed"]}
    return best["masks"], record
