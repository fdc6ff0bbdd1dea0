"""LoRAPrune: prune heads and MLP channels (or experts) progressively while LoRA fine-tunes.

After every optimizer step the LoRA-guided scores (see importance/lora_guided.py) update a moving
average, I <- λ·I + (1 − λ)·score (λ = 0.9). Every `prune_every` steps the kept counts move along
a cubic schedule from the full model to the target: nothing is pruned during the first `warmup`
of the steps (5%; the official code 10%), the target is reached (exactly, after rounding) at
1 − `cooldown` (50%; the official code 90%), and the rest train at the final shape. A pruned unit
never comes back. Masks act by output masking, so
LoRA keeps training around the removed units; at the end the model is cut, LoRA merged and saved
by the shared pipeline. Where the target counts depend on the scores (the "cost" split, global
allocation) they are fixed at the first mask update. `masks_off()` suspends the masks: the
unpruned model, which distillation uses as its teacher (distill.py).

With whole layers among the units (`layers`), the depth/width split is fixed at the first mask
update too. A layer scores the sum of its units' moving-average scores (LoRA-guided importance is
additive over the weights), the least important go first, and every number of removed layers the
ratio allows is a candidate, its rest cut from the remaining layers' heads and channels; the
candidate that removes the least total importance wins. The chosen layers then go one by one along
the same cubic schedule as the width.

On a mixture of experts the adapter covers the experts too, and whole experts and the channels inside
them are units: their budget is fixed at the first update as well (expert_choice.py), and they follow
the same schedule, experts one at a time per layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...importance.lora_guided import SCORE_KINDS, lora_guided_scores
from ...structure.scores import SCORE_FIELDS, LayerScores
from ...structure.allocate import (
    DEFAULT_SPLIT,
    KeepCounts,
    final_counts,
    full_counts,
    interpolate_counts,
    masks_from_counts,
    needs_scores,
    target_counts,
)
from ...structure.allocate import EXPERT_KINDS, LAYER_UNIT
from ...structure.depth import combine, counted_units, depth_plans, removal_order, width_units
from ...structure.masks import Masks, apply_masks
from ...structure.units import Structure
from ...training.loop import TrainHooks
from .expert_choice import choose_experts, dropped_score


@dataclass
class LoRAPruneSettings:
    prune_every: int = 10
    ema: float = 0.9  # weight of the old moving average
    score: str = "abs"  # official code: abs; paper: square
    # module: L2-normalise each module's unit scores (official code); model: one scale for the whole
    # model per step (keeps heads and channels comparable, as the "cost" split needs); none: raw.
    # auto: module under the heads-first split, model under cost.
    normalize: str = "auto"
    # The schedule: the official code starts after 10% of the steps and reaches the target at 90%
    # (0.1, 0.1). Reaching it at half the steps and training the rest at the final shape measured
    # better (README's quality table), so that is the default.
    warmup: float = 0.05  # fraction of steps before pruning starts
    cooldown: float = 0.5  # fraction of steps trained at the final shape

    def check(self) -> None:
        from ...errors import SettingError

        check_normalize(self.normalize, "LoRAPruneSettings.normalize")
        for name in ("warmup", "cooldown"):
            if not 0 <= getattr(self, name) < 1:
                raise SettingError(f"LoRAPruneSettings.{name}", f"LoRAPruneSettings.{name} is a fraction of the "
                                   f"steps in [0, 1), got {getattr(self, name)}")
        if self.warmup + self.cooldown >= 1:
            raise SettingError("LoRAPruneSettings.cooldown", "LoRAPruneSettings.warmup and "
                               "LoRAPruneSettings.cooldown are fractions of the steps with a sum below 1, "
                               f"got {self.warmup} and {self.cooldown}")
        if self.prune_every < 1:
            raise SettingError("LoRAPruneSettings.prune_every",
                               f"LoRAPruneSettings.prune_every must be at least 1, got {self.prune_every}")
        if not 0 <= self.ema < 1:
            raise SettingError("LoRAPruneSettings.ema", f"LoRAPruneSettings.ema must be in [0, 1), got {self.ema}")
        if self.score not in SCORE_KINDS:
            raise SettingError("LoRAPruneSettings.score", f"unknown LoRAPruneSettings.score '{self.score}'; use "
                               f"{' or '.join(SCORE_KINDS)}")

    def normalization(self, split: str) -> str:
        return resolve_normalize(self.normalize, split)


NORMALIZATIONS = ("auto", "module", "model", "none")


def check_normalize(value: str, setting: str) -> None:
    """One of NORMALIZATIONS; LoRAPrune's setting and masks-agree's take the same words."""
    from ...errors import SettingError

    if value not in NORMALIZATIONS:
        raise SettingError(setting, f"unknown {setting} '{value}'; use {', '.join(NORMALIZATIONS)}")


def resolve_normalize(value: str, split: str) -> str:
    """module, model or none: `auto` is model under the cost split (one scale keeps heads and channels
    comparable) and module under heads-first (the official code's)."""
    if value != "auto":
        return value
    return "model" if split == "cost" else "module"


def cubic_fraction(step: int, total: int, warmup: float, cooldown: float) -> float:
    """How far (0..1) the kept counts have moved from full to target after `step` steps."""
    begin = round(total * warmup)
    end = max(begin + 1, round(total * (1.0 - cooldown)))
    progress = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return 1.0 - (1.0 - progress) ** 3


def scale_to_unit_total(scores: list[LayerScores]) -> list[LayerScores]:
    """Divide every unit score by one constant, the step's total over all units: each step weighs the
    same in the moving average, and heads, channels and experts keep their relative scale."""
    total = sum(s.total() for s in scores)
    scale = 1.0 / total if total > 0 else 1.0
    return [LayerScores(*(getattr(s, name) * scale if getattr(s, name) is not None else None
                          for name in SCORE_FIELDS)) for s in scores]


class LoRAPruner(TrainHooks):
    """Scores, moving average, schedule and masks of a LoRAPrune run; plugs into the training loop."""

    def __init__(self, model: nn.Module, structure: Structure, *, ratio: float, layers: list[int],
                 units: tuple[str, ...], head_unit: str, round_to: int | str, allocation: str,
                 settings: LoRAPruneSettings, total_steps: int, split: str = DEFAULT_SPLIT):
        settings.check()
        self.model = model
        self.structure = structure
        # `units` may hold `layers`: the width kinds prune inside the layers that stay, and a removed
        # layer counts every projection (structure/depth.py)
        self.depth_wanted = LAYER_UNIT in units
        self.experts_wanted = any(kind in EXPERT_KINDS for kind in units)
        self.experts: dict | None = None  # the budget rule's record, on a mixture of experts
        self.ratio, self.layers, self.units = ratio, layers, width_units(units)
        self.counted = counted_units(units)
        self.removed_layers: list[int] = []  # chosen at the first update, removed along the schedule
        self.depth: dict | None = None
        self.head_unit, self.round_to, self.allocation, self.split = head_unit, round_to, allocation, split
        self.settings = settings
        self.normalization = settings.normalization(split)
        self.total_steps = total_steps
        self.full = full_counts(structure, layers, head_unit)
        # Counts that depend on the scores (global allocation, the cost split) are fixed once, from the
        # moving average at the first mask update; the others follow from the shapes alone.
        self.final: dict[int, KeepCounts] | None = (
            None if needs_scores(allocation, split, self.units) or self.depth_wanted or self.experts_wanted
            else target_counts(structure, ratio, layers, self.units, head_unit, round_to))
        self.average: list[LayerScores] | None = None
        self.counts = dict(self.full)
        self.masks = Masks()
        self.history: list[dict] = []  # per mask update: step, fraction, kept prunable share
        self._hooks = None

    # -- the moving average -------------------------------------------------------------------
    def _update_average(self, scores: list[LayerScores]) -> None:
        lam = self.settings.ema
        if self.average is None:
            self.average = [LayerScores(*(torch.zeros_like(getattr(s, name)) if getattr(s, name) is not None else None
                                          for name in SCORE_FIELDS)) for s in scores]
        for avg, new in zip(self.average, scores):
            for field in SCORE_FIELDS:
                if getattr(new, field) is not None:
                    setattr(avg, field, lam * getattr(avg, field) + (1.0 - lam) * getattr(new, field))

    # -- the schedule -------------------------------------------------------------------------
    def _due(self, step_done: int) -> bool:
        begin = round(self.total_steps * self.settings.warmup)
        end = max(begin + 1, round(self.total_steps * (1.0 - self.settings.cooldown)))
        return step_done > begin and (step_done % self.settings.prune_every == 0 or step_done == end
                                      or step_done == self.total_steps)

    def _apply(self, masks: Masks) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self.masks = masks
        self._hooks = apply_masks(self.model, masks)

    def _choose_depth(self) -> None:
        """Which layers go and what width the rest gives, from the moving average (see the module doc)."""
        layer_scores = torch.tensor([s.total() for s in self.average])
        order = removal_order(layer_scores, self.layers)
        candidates = []
        for removed, rest in depth_plans(self.structure, layer_scores, self.ratio, self.layers, self.units):
            left = [i for i in self.layers if i not in removed]
            final = (final_counts(self.structure, self.average, rest, left, self.units, self.head_unit, self.round_to,
                                  self.allocation, self.split) if rest > 1e-9 else full_counts(self.structure, left,
                                                                                               self.head_unit))
            width = masks_from_counts(self.structure, self.average, final, self.head_unit)
            lost = float(layer_scores[removed].sum()) + dropped_score(self.average, width, self.structure,
                                                                      self.head_unit)
            candidates.append({"layers_removed": removed, "width_ratio": round(rest, 4), "pruned_score": lost,
                               "final": final, "left": left})
        if not candidates:
            from ...errors import SettingError

            raise SettingError("PruneSettings.ratio", f"no number of whole layers leaves a {self.ratio} cut that the "
                               "remaining layers can give; add heads or channels to PruneSettings.units, or lower "
                               "PruneSettings.ratio")
        best = min(candidates, key=lambda c: c["pruned_score"])
        self.removed_layers, self.final, self.layers = best["layers_removed"], best["final"], best["left"]
        self.full = full_counts(self.structure, self.layers, self.head_unit)
        self.counts = {i: c for i, c in self.counts.items() if i in self.layers}
        self.depth = {"layer_score": "sum of the layer's moving-average LoRA-guided unit scores",
                      "scores": [round(float(v), 8) for v in layer_scores],
                      "removal_order": [i for i in order if i in best["layers_removed"]],
                      "candidates": [{k: v for k, v in c.items() if k not in ("final", "left")} for c in candidates],
                      "layers_removed": self.removed_layers}

    def update_masks(self, step_done: int, fraction: float | None = None) -> None:
        if self.final is None:  # fixed once, from the scores at the first update
            if self.depth_wanted:
                self._choose_depth()
            elif self.experts_wanted:
                self.final, self.experts = choose_experts(self.structure, self.average, self.ratio, self.layers,
                                                          self.units, self.head_unit, self.round_to, self.allocation,
                                                          self.split)
            else:
                self.final = final_counts(self.structure, self.average, self.ratio, self.layers, self.units,
                                          self.head_unit, self.round_to, self.allocation, self.split)
        if fraction is None:
            fraction = cubic_fraction(step_done, self.total_steps, self.settings.warmup, self.settings.cooldown)
        intermediate = {i: self.structure.layers[i].intermediate for i in self.layers}
        self.counts = interpolate_counts(self.full, self.final, fraction, self.round_to, intermediate, self.counts)
        masks = masks_from_counts(self.structure, self.average, self.counts, self.head_unit, self.masks)
        if self.removed_layers:  # the least important first, as many as the schedule has reached
            order = self.depth["removal_order"]
            masks = combine(masks, self.structure, sorted(order[:round(fraction * len(order))]))
        self._apply(masks)
        self.history.append({"step": step_done, "fraction": fraction, "kept": self.kept_share()})

    def masks_off(self):
        """Inside this block the model runs unpruned (the distillation teacher's pass)."""
        return self._hooks.suspended() if self._hooks is not None else contextlib.nullcontext()

    def kept_share(self) -> float:
        """Share of the prunable parameters the current masks keep."""
        from ...structure.allocate import achieved_ratio

        layers = sorted(set(self.layers) | set(self.removed_layers))
        return 1.0 - achieved_ratio(self.structure, self.masks, layers, self.counted)

    def finish(self) -> Masks:
        """Make sure the target is reached (short runs), take the hooks off, return the final masks."""
        if self.average is None:
            raise ValueError("no scores yet: LoRAPrune needs at least one training step")
        if self.counts != self.final or (self.removed_layers and self.masks.layers is not None
                                         and int((~self.masks.layers).sum()) < len(self.removed_layers)):
            self.update_masks(self.total_steps, fraction=1.0)
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        return self.masks

    # -- TrainHooks -----------------------------------------------------------------------------
    def before_optimizer_step(self, step: int) -> None:
        scores = lora_guided_scores(self.model, score=self.settings.score, normalize=self.normalization == "module")
        if self.normalization == "model":
            scores = scale_to_unit_total(scores)
        self._update_average(scores)
        if self._due(step + 1):
            self.update_masks(step + 1)

    def state_dict(self) -> dict:
        return {
            "average": [vars(s).copy() for s in self.average] if self.average else None,
            "counts": {i: vars(c).copy() for i, c in self.counts.items()},
            "final": {i: vars(c).copy() for i, c in self.final.items()} if self.final else None,
            "masks": self.masks.kept_summary(self.structure),
            "history": self.history,
            "depth": self.depth,
            "experts": self.experts,
            "layers": self.layers,
        }

    def load_state_dict(self, state: dict) -> None:
        self.average = [LayerScores(**s) for s in state["average"]] if state["average"] else None
        self.counts = {int(i): KeepCounts(**c) for i, c in state["counts"].items()}
        self.final = {int(i): KeepCounts(**c) for i, c in state["final"].items()} if state["final"] else None
        self.history = list(state["history"])
        self.depth = state.get("depth")
        self.experts = state.get("experts")
        if self.depth is not None:
            self.removed_layers = list(self.depth["layers_removed"])
            self.layers = list(state["layers"])
            self.full = full_counts(self.structure, self.layers, self.head_unit)
        self._apply(Masks.from_summary(state["masks"], self.structure))
