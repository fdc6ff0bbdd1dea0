"""From unit scores and a target ratio to keep-masks.

`--ratio` is the fraction of *prunable* parameters removed: the q, k, v, o, gate, up and down
weights (and their biases) of the layers chosen for pruning, for the unit kinds being pruned.
Embeddings, norms, lm_head and the layers left alone do not count.

Each pruned layer gets the same budget (uniform allocation): it keeps (1 - ratio) of its prunable
parameters. Attention units are few (SmolLM2 has three key/value groups a layer), so heads are
rounded first and MLP channels fill the rest of the budget, rounded to a multiple of `round_to`
(GPU kernels are fastest on widths that are multiples of 64/128; see DESIGN.md). The achieved
ratio is therefore close to, not exactly, the target; the summary prints both.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import UserError
from ..importance.scores import LayerScores
from .masks import Masks
from .units import HEAD_UNITS, Structure

UNIT_KINDS = ("heads", "channels")


def paper_layers(num_layers: int) -> list[int]:
    """LoRAPrune's (and LLM-Pruner's) choice: leave the first 10% of layers and the last layer unpruned."""
    first = int(num_layers * 0.1)
    return list(range(first, num_layers - 1)) if num_layers > 1 else [0]


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'all' (the default), 'paper', or a list like '3-27' or '0,2,5-9' (inclusive ranges).

    Pruning every layer alike keeps the model loadable by stock transformers (and servable by
    vLLM); 'paper' usually loses less quality but gives layers of different shapes.
    """
    if spec == "paper":
        return paper_layers(num_layers)
    if spec in (None, "", "all"):
        return list(range(num_layers))
    chosen: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"cannot read --layers '{spec}'; use 'all', 'paper', or ranges like '3-27' or '0,2,5-9'")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo > hi or hi >= num_layers:
            raise UserError(f"--layers '{part.strip()}' is outside the model's layers 0-{num_layers - 1}")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def parse_units(spec: str) -> tuple[str, ...]:
    units = tuple(u.strip() for u in spec.split(",") if u.strip())
    bad = [u for u in units if u not in UNIT_KINDS]
    if bad or not units:
        raise UserError(f"unknown unit kind {bad or spec!r}; use {' or '.join(UNIT_KINDS)} (comma-separated)")
    return units


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[torch.argsort(scores.float().cpu(), descending=True, stable=True)[:k]] = True
    return keep


def round_count(count: float, multiple: int, total: int) -> int:
    """Nearest multiple of `multiple`, at least one multiple and at most `total`."""
    step = max(1, min(multiple, total))
    return int(min(total, max(step, step * round(count / step))))


def select_masks(
    structure: Structure,
    scores: list[LayerScores],
    ratio: float,
    layers: list[int],
    units: tuple[str, ...] = UNIT_KINDS,
    head_unit: str = "kv-group",
    round_to: int = 64,
) -> Masks:
    """Keep the best-scoring units of each chosen layer within that layer's parameter budget."""
    check_ratio(ratio)
    if head_unit not in HEAD_UNITS:
        raise UserError(f"unknown head unit '{head_unit}'; use {' or '.join(HEAD_UNITS)}")
    if round_to < 1:
        raise UserError(f"--round-to must be at least 1, got {round_to}")
    masks = Masks()
    for i in layers:
        shape, layer_scores = structure.layers[i], scores[i]
        budget = (1.0 - ratio) * structure.prunable_params([i], units)
        if "heads" in units:
            unit_scores = layer_scores.head_unit_scores(head_unit)
            if head_unit == "kv-group":
                kept_kv = min(shape.num_kv_heads, max(1, round((1.0 - ratio) * shape.num_kv_heads)))
                heads = Masks.heads_from_kv(_top(unit_scores, kept_kv), shape.group_size)
            else:
                per_group = min(shape.group_size, max(1, round((1.0 - ratio) * shape.group_size)))
                grouped = unit_scores.reshape(shape.num_kv_heads, shape.group_size)
                heads = torch.cat([_top(g, per_group) for g in grouped])
            if not heads.all():
                masks.heads[i] = heads
            kept_q = int(heads.sum())
            kept_kv = int(heads.reshape(shape.num_kv_heads, -1).any(dim=1).sum())
            budget -= kept_q * structure.params_per_q_head + kept_kv * structure.params_per_kv_head
        if "channels" in units:
            wanted = max(0.0, budget) / structure.params_per_channel
            kept = round_count(wanted, round_to, shape.intermediate)
            if kept < shape.intermediate:
                masks.channels[i] = _top(layer_scores.channels, kept)
    return masks


def achieved_ratio(before: Structure, masks: Masks, layers: list[int], units: tuple[str, ...]) -> float:
    """Fraction of the prunable parameters of `layers` that the masks remove."""
    total = before.prunable_params(layers, units)
    kept = 0
    for i in layers:
        shape = before.layers[i]
        heads = masks.heads.get(i)
        kv = masks.kv_heads(i, before)
        if "heads" in units:
            q = shape.num_heads if heads is None else int(heads.sum())
            k = shape.num_kv_heads if kv is None else int(kv.sum())
            kept += q * before.params_per_q_head + k * before.params_per_kv_head
        if "channels" in units:
            channels = masks.channels.get(i)
            kept += (shape.intermediate if channels is None else int(channels.sum())) * before.params_per_channel
    return 1.0 - kept / total if total else 0.0


def describe_prunable(structure: Structure, layers: list[int], units: tuple[str, ...]) -> str:
    parts = []
    if "heads" in units:
        parts.append("attention q,k,v,o")
    if "channels" in units:
        parts.append("MLP gate,up,down")
    spans = _spans(layers)
    untouched = _spans(sorted(set(range(structure.num_layers)) - set(layers)))
    text = f"{' and '.join(parts)} weights in layers {spans} ({structure.prunable_params(layers, units):,} parameters)"
    text += "; not pruned: embeddings, norms, lm_head" + (f", layers {untouched}" if untouched else "")
    return text


def _spans(indices: list[int]) -> str:
    if not indices:
        return ""
    spans, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [math.inf]:
        if i != prev + 1:
            spans.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = i
        prev = i
    return ",".join(spans)
