"""From unit scores and a target ratio to keep-masks.

`--ratio` is the fraction of *prunable* parameters removed: the q, k, v, o, gate, up and down
weights (and their biases) of the layers chosen for pruning, for the unit kinds being pruned.
Embeddings, norms, lm_head and the layers left alone do not count.

Each pruned layer gets the same budget (uniform allocation): it keeps (1 - ratio) of its prunable
parameters; global allocation ranks units across layers instead. How a budget is split between
attention units and MLP channels is the `split` rule:

- "cost" (the default): importance per parameter decides. A head unit is coarse (on SmolLM2 a
  key/value group is a third of a layer's attention, 295k parameters, as much as 171 channels), so
  every possible number of kept head units is tried, channels fill the rest of the budget, and the
  combination that removes the least total score wins: a head goes only when it is worth less than
  the channels it would spare. Under uniform allocation the pruned layers choose together (summed
  scores), so they keep one shape and a model pruned in every layer stays stock-loadable; under
  global allocation all units of all layers are ranked by score per parameter. This needs scores on
  one scale for heads and channels: first-order
  estimates of the loss change (taylor, and LoRAPrune's criterion without per-module normalisation)
  are, being sums over weights.
- "heads-first" (the official code and LLM-Pruner): every layer loses `ratio` of its head units,
  rounded, and MLP channels fill the rest of the budget, whatever the scores say.

MLP channel counts are rounded to a multiple of `round_to` ("auto" by default: 128 on wide MLPs, 64
on narrow ones; see DEFAULT_ROUND_TO). The achieved ratio is therefore close to, not exactly, the
target; the summary prints both.

Ties: unit selection sorts scores with a stable descending sort, so among equal scores the unit
with the lower index (and, in global ranking, the lower layer) is kept; among equally cheap splits
the one keeping more head units wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import SettingError, UserError
from .scores import LayerScores
from .masks import Masks
from .units import HEAD_UNITS, Structure

UNIT_KINDS = ("heads", "channels")  # the width units; whole layers are the depth unit (depth.py)
LAYER_UNIT = "layers"
EXPERT_KINDS = ("experts", "expert-channels")  # a mixture of experts' MLP units (structure/experts.py)
ALLOCATIONS = ("uniform", "global")
SPLITS = ("cost", "heads-first")
DEFAULT_SPLIT = "cost"

# Default MLP channel rounding, the one place it lives (PruneSettings, `prune --round-to`, LoRAPrune):
# "auto" = multiples of 128 where a layer's MLP is at least AUTO_WIDE wide, of 64 below.
# Why: measured on an H100 (LLaMA-7B, 2048-token prefill), width 8806 was 45% slower than dense,
# 8832 = 69·128 and 5504 = 43·128 faster. 8806 is not even a multiple of 8 (bf16 tensor-core
# alignment); 64 fixes that, but gives 8768 = 137·64 at 20%, never measured, which cuBLAS runs in
# as many 128-wide output tiles as 8832 (69): the cost of 8832 with 64 fewer channels. 128 stays on
# the measured-fast widths at no cost in precision on 7B-class MLPs (LLaMA-7B 20%: 8704, ratio
# 0.202 vs 0.198; 50%: 5504 either way). On narrow MLPs (SmolLM2: 1536) 128 is 8% of the width and
# moves the ratio by up to 3 points, while GEMMs that small are launch- and memory-bound: 64 there.
DEFAULT_ROUND_TO = "auto"
AUTO_WIDE = 4096


def parse_round_to(value: int | str, setting: str = "PruneSettings.round_to") -> int | str:
    """'auto' or a whole number of channels (at least 1), from the command line or the API; `setting`
    names the field in the error."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise SettingError(setting, f"{setting} must be 'auto' or a whole number of at least 1, got {value!r}")
    return number


def channel_multiple(round_to: int | str, width: int) -> int:
    """The multiple that MLP channel counts are rounded to in a layer `width` channels wide."""
    if round_to == "auto":
        return 128 if width >= AUTO_WIDE else 64
    return int(round_to)


def paper_layers(num_layers: int) -> list[int]:
    """LoRAPrune's (and LLM-Pruner's) choice: leave the first 10% of layers and the last layer unpruned."""
    first = int(num_layers * 0.1)
    return list(range(first, num_layers - 1)) if num_layers > 1 else [0]


def parse_layers(spec: str | None, num_layers: int, setting: str = "PruneSettings.layers") -> list[int]:
    """'all' (the default), 'paper', or a list like '3-27' or '0,2,5-9' (inclusive ranges); `setting`
    names the field in the error.

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
            raise SettingError(setting, f"cannot read {setting} '{spec}'; use 'all', 'paper', or ranges like "
                               "'3-27' or '0,2,5-9'")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo > hi or hi >= num_layers:
            raise SettingError(setting, f"{setting} '{part.strip()}' is outside the model's layers "
                               f"0-{num_layers - 1}")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def parse_units(spec: str, setting: str = "PruneSettings.units") -> tuple[str, ...]:
    units = tuple(u.strip() for u in spec.split(",") if u.strip())
    bad = [u for u in units if u not in (*UNIT_KINDS, LAYER_UNIT, *EXPERT_KINDS)]
    if bad or not units:
        raise SettingError(setting, f"unknown unit kind {bad or spec!r} in {setting}; use "
                           f"{', '.join((*UNIT_KINDS, LAYER_UNIT, *EXPERT_KINDS))} (comma-separated)")
    return units


def check_ratio(ratio: float, setting: str = "PruneSettings.ratio") -> None:
    if not 0.0 < ratio < 1.0:
        raise SettingError(setting, f"{setting} must be between 0 and 1 (exclusive), got {ratio}")


def _top(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the k best scores; units outside `allowed` (already pruned) are never chosen."""
    scores = scores.float().cpu().clone()
    if allowed is not None:
        scores[~allowed.cpu()] = -math.inf
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    return keep


def round_count(count: float, multiple: int | str, total: int) -> int:
    """Nearest multiple of `multiple` ("auto": see DEFAULT_ROUND_TO), at least one multiple and at most `total`."""
    step = max(1, min(channel_multiple(multiple, total), total))
    return int(min(total, max(step, step * round(count / step))))


@dataclass(frozen=True)
class KeepCounts:
    """What one layer keeps: attention units (kv groups, or query heads per group) and MLP channels; in
    a mixture of experts, `channels` is each expert's width and `experts` how many experts stay (None:
    all of them, and in a dense layer)."""

    head_units: int
    channels: int
    experts: int | None = None


def full_counts(structure: Structure, layers, head_unit: str) -> dict[int, KeepCounts]:
    def heads(shape):
        return shape.num_kv_heads if head_unit == "kv-group" else shape.group_size
    return {i: KeepCounts(heads(structure.layers[i]), structure.layers[i].intermediate,
                          structure.layers[i].experts or None)
            for i in layers}


def _check(ratio: float, head_unit: str, round_to: int | str) -> None:
    check_ratio(ratio)
    if head_unit not in HEAD_UNITS:
        raise UserError(f"unknown head unit '{head_unit}'; use {' or '.join(HEAD_UNITS)}")
    parse_round_to(round_to)


def target_counts(structure: Structure, ratio: float, layers, units=UNIT_KINDS, head_unit: str = "kv-group",
                  round_to: int | str = DEFAULT_ROUND_TO) -> dict[int, KeepCounts]:
    """Uniform allocation: every chosen layer keeps (1 - ratio) of its prunable parameters."""
    _check(ratio, head_unit, round_to)
    counts = {}
    for i, full in full_counts(structure, layers, head_unit).items():
        shape = structure.layers[i]
        budget = (1.0 - ratio) * structure.prunable_params([i], units)
        head_units = full.head_units
        if "heads" in units:
            head_units = min(full.head_units, max(1, round((1.0 - ratio) * full.head_units)))
            kept_q, kept_kv = _heads_kept(shape, head_unit, head_units)
            budget -= kept_q * structure.params_per_q_head + kept_kv * structure.params_per_kv_head
        channels = full.channels
        if "channels" in units:
            channels = round_count(max(0.0, budget) / structure.params_per_channel, round_to, shape.intermediate)
        counts[i] = KeepCounts(head_units, channels)
    return counts


def _heads_kept(shape, head_unit: str, head_units: int) -> tuple[int, int]:
    """(query heads, kv heads) kept for a count of attention units."""
    if head_unit == "kv-group":
        return head_units * shape.group_size, head_units
    return head_units * shape.num_kv_heads, shape.num_kv_heads


def global_counts(structure: Structure, scores: list[LayerScores], ratio: float, layers, units=UNIT_KINDS,
                  head_unit: str = "kv-group", round_to: int | str = DEFAULT_ROUND_TO) -> dict[int, KeepCounts]:
    """Global allocation: the same totals as uniform, spread over layers by ranking all units together."""
    uniform = target_counts(structure, ratio, layers, units, head_unit, round_to)
    full = full_counts(structure, layers, head_unit)
    head_units = {i: full[i].head_units for i in layers}
    channels = {i: full[i].channels for i in layers}
    if "heads" in units:
        if head_unit == "kv-group":
            per_layer = {i: scores[i].head_unit_scores(head_unit) for i in layers}
        else:  # one score per query-head rank inside a group: the layer keeps the same number in every group
            per_layer = {i: scores[i].q_heads.reshape(structure.layers[i].num_kv_heads, -1).sort(dim=1, descending=True)
                         .values.mean(dim=0) for i in layers}
        won = _global_winners(per_layer, sum(c.head_units for c in uniform.values()))
        head_units = {i: max(1, won[i]) for i in layers}
    if "channels" in units:
        won = _global_winners({i: scores[i].channels for i in layers}, sum(c.channels for c in uniform.values()))
        channels = {i: round_count(won[i], round_to, structure.layers[i].intermediate) for i in layers}
    return {i: KeepCounts(head_units[i], channels[i]) for i in layers}


def _global_winners(per_layer: dict[int, torch.Tensor], total: int) -> dict[int, int]:
    owners = torch.cat([torch.full((len(v),), i) for i, v in per_layer.items()])
    values = torch.cat([v.float().cpu() for v in per_layer.values()])
    best = owners[torch.argsort(values, descending=True, stable=True)[:total]]
    return {i: int((best == i).sum()) for i in per_layer}


def head_unit_cost(structure: Structure, shape, head_unit: str) -> int:
    """Parameters one attention unit holds: a key/value group with its query heads, or (q-head) one
    query head in every group, since a layer keeps the same number of query heads per group."""
    if head_unit == "kv-group":
        return shape.group_size * structure.params_per_q_head + structure.params_per_kv_head
    return shape.num_kv_heads * structure.params_per_q_head


def fixed_attention(structure: Structure, shape, head_unit: str) -> int:
    """Attention parameters no head unit removes: with q-head units every key/value head stays."""
    return 0 if head_unit == "kv-group" else shape.num_kv_heads * structure.params_per_kv_head


def ranked_head_unit_scores(scores: LayerScores, shape, head_unit: str) -> torch.Tensor:
    """A layer's attention-unit scores, best first. For q-head, unit r is every group's r-th best
    query head (what a layer keeping r + 1 heads per group keeps), scored by their sum."""
    if head_unit == "kv-group":
        return scores.head_unit_scores(head_unit).float().cpu().sort(descending=True, stable=True).values
    grouped = scores.q_heads.float().cpu().reshape(shape.num_kv_heads, -1)
    return grouped.sort(dim=1, descending=True, stable=True).values.sum(dim=0)


def _kept_score(ranked: torch.Tensor, count: float) -> float:
    """Total score of the best `count` units (fractional counts interpolate the next unit)."""
    whole = int(count)
    total = float(ranked[:whole].sum())
    if whole < len(ranked):
        total += (count - whole) * float(ranked[whole])
    return total


def cost_counts(structure: Structure, scores: list[LayerScores], ratio: float, layers, units=UNIT_KINDS,
                head_unit: str = "kv-group", round_to: int | str = DEFAULT_ROUND_TO,
                allocation: str = "uniform") -> dict[int, KeepCounts]:
    """The "cost" split: heads and channels compete on score per parameter (see the module docstring)."""
    _check(ratio, head_unit, round_to)
    if set(units) != set(UNIT_KINDS):  # one kind only: nothing to split
        return (target_counts(structure, ratio, layers, units, head_unit, round_to) if allocation == "uniform"
                else global_counts(structure, scores, ratio, layers, units, head_unit, round_to))
    if allocation == "global":
        return _cost_counts_global(structure, scores, ratio, layers, head_unit, round_to)
    # Uniform allocation keeps one shape for every pruned layer of a shape (so a model pruned in all
    # its layers stays stock-loadable): the split is chosen for the layers together, by their total.
    by_shape: dict = {}
    for i in layers:
        by_shape.setdefault(structure.layers[i], []).append(i)
    counts = {}
    for shape, group in by_shape.items():
        budget = ((1.0 - ratio) * structure.prunable_params([group[0]], units)
                  - fixed_attention(structure, shape, head_unit))
        unit_cost = head_unit_cost(structure, shape, head_unit)
        heads = [ranked_head_unit_scores(scores[i], shape, head_unit) for i in group]
        channels = [scores[i].channels.float().cpu().sort(descending=True, stable=True).values for i in group]
        best = None  # (infeasible, removed score, head units, channels)
        for kept in range(len(heads[0]), 0, -1):  # more heads first: an equal loss keeps more heads
            spare = (budget - kept * unit_cost) / structure.params_per_channel
            feasible = 0.0 <= spare <= shape.intermediate
            spare = min(float(shape.intermediate), max(0.0, spare))
            removed = sum(float(h.sum()) - _kept_score(h, kept) + float(c.sum()) - _kept_score(c, spare)
                          for h, c in zip(heads, channels))
            candidate = (not feasible, removed, kept, spare)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        _, _, kept, spare = best
        for i in group:
            counts[i] = KeepCounts(kept, round_count(spare, round_to, shape.intermediate))
    return {i: counts[i] for i in layers}


def _cost_counts_global(structure: Structure, scores: list[LayerScores], ratio: float, layers,
                        head_unit: str, round_to: int | str) -> dict[int, KeepCounts]:
    """Rank every unit of every pruned layer by score per parameter; remove the cheapest until the
    model's prunable parameters are down by `ratio`. Every layer keeps at least one head unit."""
    owners, kinds, values, costs = [], [], [], []
    for i in layers:
        shape = structure.layers[i]
        ranked = ranked_head_unit_scores(scores[i], shape, head_unit)
        unit_cost = head_unit_cost(structure, shape, head_unit)
        # a layer's head units go worst first; the best one is never offered (at least one stays)
        for value in ranked[1:]:
            owners.append(i), kinds.append(0), values.append(float(value) / unit_cost), costs.append(unit_cost)
        for value in scores[i].channels.float().cpu():
            owners.append(i), kinds.append(1), values.append(float(value) / structure.params_per_channel)
            costs.append(structure.params_per_channel)
    # cheapest first; among equal values the higher layer, channels before heads and the higher
    # index go first, so the stated tie rule (lower index and layer kept, more heads kept) holds
    order = sorted(range(len(values)), key=lambda j: (values[j], -owners[j], -kinds[j], -j))
    to_remove = ratio * structure.prunable_params(layers, UNIT_KINDS)
    removed_heads = dict.fromkeys(layers, 0)
    removed_channels = dict.fromkeys(layers, 0)
    removed = 0.0
    for index in order:
        if removed >= to_remove:
            break
        if kinds[index] == 0:
            removed_heads[owners[index]] += 1
        else:
            removed_channels[owners[index]] += 1
        removed += costs[index]
    full = full_counts(structure, layers, head_unit)
    return {i: KeepCounts(full[i].head_units - removed_heads[i],
                          round_count(full[i].channels - removed_channels[i], round_to,
                                      structure.layers[i].intermediate))
            for i in layers}


def final_counts(structure: Structure, scores: list[LayerScores] | None, ratio: float, layers, units=UNIT_KINDS,
                 head_unit: str = "kv-group", round_to: int | str = DEFAULT_ROUND_TO, allocation: str = "uniform",
                 split: str = DEFAULT_SPLIT) -> dict[int, KeepCounts]:
    """What each pruned layer keeps at the target, under an allocation and a split rule."""
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation '{allocation}'; use {' or '.join(ALLOCATIONS)}")
    if split not in SPLITS:
        raise SettingError("PruneSettings.split", f"unknown PruneSettings.split '{split}'; use {' or '.join(SPLITS)}")
    if split == "cost":
        return cost_counts(structure, scores, ratio, layers, units, head_unit, round_to, allocation)
    if allocation == "uniform":
        return target_counts(structure, ratio, layers, units, head_unit, round_to)
    return global_counts(structure, scores, ratio, layers, units, head_unit, round_to)


def needs_scores(allocation: str, split: str, units) -> bool:
    """Whether the target counts depend on the scores (otherwise they follow from the shapes alone)."""
    return allocation == "global" or (split == "cost" and set(units) == set(UNIT_KINDS))


def interpolate_counts(full: dict[int, KeepCounts], final: dict[int, KeepCounts], fraction: float, round_to: int | str,
                       intermediate: dict[int, int],
                       previous: dict[int, KeepCounts] | None = None) -> dict[int, KeepCounts]:
    """Counts `fraction` of the way from `full` to `final`, never above `previous` (pruned units stay pruned)."""
    counts = {}
    for i in final:
        f, t = full[i], final[i]
        heads = max(t.head_units, round(f.head_units - fraction * (f.head_units - t.head_units)))
        channels = max(t.channels, min(f.channels, round_count(f.channels - fraction * (f.channels - t.channels),
                                                               round_to, intermediate[i])))
        experts = (None if t.experts is None
                   else max(t.experts, round(f.experts - fraction * (f.experts - t.experts))))
        if previous is not None:
            heads, channels = min(heads, previous[i].head_units), min(channels, previous[i].channels)
            if experts is not None and previous[i].experts is not None:
                experts = min(experts, previous[i].experts)
        counts[i] = KeepCounts(heads, channels, experts)
    return counts


def masks_from_counts(structure: Structure, scores: list[LayerScores], counts: dict[int, KeepCounts],
                      head_unit: str = "kv-group", current: Masks | None = None) -> Masks:
    """Keep each layer's best units at the given counts; units `current` already removed stay removed."""
    masks = Masks()
    for i, count in counts.items():
        shape, layer_scores = structure.layers[i], scores[i]
        allowed_heads = current.heads.get(i) if current is not None else None
        unit_scores = layer_scores.head_unit_scores(head_unit)
        if head_unit == "kv-group":
            allowed = allowed_heads.reshape(shape.num_kv_heads, -1).any(dim=1) if allowed_heads is not None else None
            heads = Masks.heads_from_kv(_top(unit_scores, count.head_units, allowed), shape.group_size)
        else:
            grouped = unit_scores.reshape(shape.num_kv_heads, shape.group_size)
            allowed = (allowed_heads.reshape(shape.num_kv_heads, -1) if allowed_heads is not None
                       else [None] * len(grouped))
            heads = torch.cat([_top(g, count.head_units, a) for g, a in zip(grouped, allowed)])
        if not heads.all():
            masks.heads[i] = heads
        if shape.experts:
            _expert_masks_from_counts(masks, i, shape, layer_scores, count, current)
        elif count.channels < shape.intermediate:
            allowed = current.channels.get(i) if current is not None else None
            masks.channels[i] = _top(layer_scores.channels, count.channels, allowed)
    return masks


def _expert_masks_from_counts(masks: Masks, i: int, shape, scores: LayerScores, count: KeepCounts,
                              current: Masks | None) -> None:
    """A mixture-of-experts layer's best `count.experts` experts, each keeping its best `count.channels`
    channels (every expert, kept or not, the same number: the masks' invariant)."""
    if count.experts is not None and count.experts < shape.experts:
        allowed = current.experts.get(i) if current is not None else None
        masks.experts[i] = _top(scores.experts, count.experts, allowed)
    if count.channels < shape.intermediate:
        allowed = current.expert_channels.get(i) if current is not None else None
        masks.expert_channels[i] = torch.stack([
            _top(scores.expert_channels[e], count.channels, allowed[e] if allowed is not None else None)
            for e in range(shape.experts)])


def select_masks(
    structure: Structure,
    scores: list[LayerScores],
    ratio: float,
    layers: list[int],
    units: tuple[str, ...] = UNIT_KINDS,
    head_unit: str = "kv-group",
    round_to: int | str = DEFAULT_ROUND_TO,
    allocation: str = "uniform",
    split: str = DEFAULT_SPLIT,
) -> Masks:
    """Keep the best-scoring units of each chosen layer within its parameter budget (one shot)."""
    counts = final_counts(structure, scores, ratio, layers, units, head_unit, round_to, allocation, split)
    return masks_from_counts(structure, scores, counts, head_unit)


def achieved_ratio(before: Structure, masks: Masks, layers: list[int], units: tuple[str, ...]) -> float:
    """Fraction of the prunable parameters of `layers` that the masks remove (a removed layer, all of its own)."""
    total = before.prunable_params(layers, units)
    kept = 0
    for i in layers:
        if not masks.layer_kept(i):
            continue
        shape = before.layers[i]
        heads = masks.heads.get(i)
        kv = masks.kv_heads(i, before)
        if "heads" in units:
            q = shape.num_heads if heads is None else int(heads.sum())
            k = shape.num_kv_heads if kv is None else int(kv.sum())
            kept += q * before.params_per_q_head + k * before.params_per_kv_head
        if shape.experts and ("channels" in units or any(u in units for u in EXPERT_KINDS)):
            experts = masks.experts.get(i)
            inside = masks.expert_channels.get(i)
            count = shape.experts if experts is None else int(experts.sum())
            width = shape.intermediate if inside is None else int(inside[0].sum())
            kept += count * before.expert_params(width)
        elif "channels" in units:
            channels = masks.channels.get(i)
            kept += (shape.intermediate if channels is None else int(channels.sum())) * before.params_per_channel
    return 1.0 - kept / total if total else 0.0


def describe_prunable(structure: Structure, layers: list[int], units: tuple[str, ...]) -> str:
    parts = []
    if "heads" in units:
        parts.append("attention q,k,v,o")
    if "channels" in units:
        parts.append("MLP gate,up,down")
    if any(u in units for u in EXPERT_KINDS):
        parts.append("experts' gate_up,down and router rows")
    spans = _spans(layers)
    untouched = sorted(set(range(structure.num_layers)) - set(layers))
    text = f"{' and '.join(parts)} weights in {_layers_word(layers)} {spans} " \
           f"({structure.prunable_params(layers, units):,} parameters)"
    text += "; not pruned: embeddings, norms, lm_head" + (f", {_layers_word(untouched)} {_spans(untouched)}"
                                                          if untouched else "")
    return text


def _layers_word(indices: list[int]) -> str:
    return "layer" if len(indices) == 1 else "layers"


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
