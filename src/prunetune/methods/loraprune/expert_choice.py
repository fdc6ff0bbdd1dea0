"""LoRAPrune on a mixture of experts: how the budget is shared between whole experts, the channels
inside them and attention heads, fixed at the first mask update.

The candidates are the one-shot rule's (methods/expert_budget.py): every number of experts removed per
layer, the rest of the budget from the same fraction of heads and expert channels. One-shot pruning runs
the model on each and keeps the lowest calibration loss; LoRAPrune scores as it trains, so it keeps the
candidate that removes the least moving-average LoRA-guided score, as it does for whole layers. An
expert scores the sum of its channels (the estimate is additive over weights), so experts, channels
and heads are on one scale. An expert no token was routed to gives its adapter no gradient and scores
zero: it goes first. The counts then move along the same cubic schedule as the heads.
"""

from __future__ import annotations

from ...structure.allocate import KeepCounts
from ...structure.masks import Masks
from ...structure.scores import LayerScores
from ...structure.units import Structure
from ..expert_budget import budget_record, expert_candidates

RULE = ("every count of experts removed per layer is a candidate; the rest of the budget takes the same fraction of "
        "attention heads and expert channels; the candidate that removes the least moving-average LoRA-guided score "
        "wins, at the first mask update")


def dropped_score(scores: list[LayerScores], masks: Masks, structure: Structure, head_unit: str) -> float:
    """The total score of what `masks` drop: heads (as pruned units), channels, whole experts, and the
    channels cut from the experts that stay."""
    total = 0.0
    for i, keep in masks.heads.items():
        units = scores[i].head_unit_scores(head_unit)
        kept = masks.kv_heads(i, structure) if head_unit == "kv-group" else keep
        total += float(units[~kept].sum())
    for i, keep in masks.channels.items():
        total += float(scores[i].channels[~keep].sum())
    for i, keep in masks.experts.items():
        total += float(scores[i].experts[~keep].sum())
    for i, keep in masks.expert_channels.items():
        staying = masks.experts.get(i)
        dropped = scores[i].expert_channels * (~keep).float()
        total += float((dropped if staying is None else dropped[staying]).sum())
    return total


def kept_counts(masks: Masks, structure: Structure, layers: list[int], head_unit: str) -> dict[int, KeepCounts]:
    """Per layer, how many head units, expert channels and experts `masks` keep (every group and every
    expert alike, as the expert rule's masks do)."""
    counts = {}
    for i in layers:
        shape = structure.layers[i]
        heads = masks.heads.get(i)
        if head_unit == "kv-group":
            kv = masks.kv_heads(i, structure)
            head_units = shape.num_kv_heads if kv is None else int(kv.sum())
        else:
            head_units = shape.group_size if heads is None else int(heads.reshape(shape.num_kv_heads, -1)[0].sum())
        inside, experts = masks.expert_channels.get(i), masks.experts.get(i)
        counts[i] = KeepCounts(head_units, shape.intermediate if inside is None else int(inside[0].sum()),
                               shape.experts if experts is None else int(experts.sum()))
    return counts


def choose_experts(structure: Structure, scores: list[LayerScores], ratio: float, layers: list[int],
                   units: tuple[str, ...], head_unit: str, round_to: int | str, allocation: str,
                   split: str) -> tuple[dict[int, KeepCounts], dict]:
    """The final counts and the record's account of the choice (see the module doc)."""
    candidates = expert_candidates(structure, scores, None, ratio, layers, units, head_unit, round_to, allocation,
                                   split)
    for candidate in candidates:
        candidate["pruned_score"] = dropped_score(scores, candidate["masks"], structure, head_unit)
    best = min(candidates, key=lambda c: c["pruned_score"])
    return kept_counts(best["masks"], structure, layers, head_unit), budget_record(RULE, candidates, best)
