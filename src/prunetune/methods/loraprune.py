"""LoRAPrune: prune heads and MLP channels progressively while LoRA fine-tunes.

After every optimizer step the LoRA-guided scores (see importance/lora_guided.py) update a moving
average, I <- λ·I + (1 − λ)·score (λ = 0.9). Every `prune_every` steps the kept counts move along
a cubic schedule from the full model to the target: nothing is pruned during the first 10% of the
steps, the target is reached (exactly, after rounding) at 90%, and the last 10% train at the final
shape. A pruned unit never comes back. Masks act by output masking, so LoRA keeps training around
the removed units; at the end the model is cut, LoRA merged and saved by the shared pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..importance.lora_guided import SCORE_KINDS, lora_guided_scores
from ..importance.scores import LayerScores
from ..structure.allocate import (
    KeepCounts, full_counts, global_counts, interpolate_counts, masks_from_counts, target_counts,
)
from ..structure.masks import Masks, apply_masks
from ..structure.units import Structure
from ..train import TrainHooks


@dataclass
class LoRAPruneSettings:
    prune_every: int = 10
    ema: float = 0.9  # weight of the old moving average
    score: str = "abs"  # official code: abs; paper: square
    normalize: bool = True  # L2-normalise each module's unit scores (official code)
    warmup: float = 0.1  # fraction of steps before pruning starts
    cooldown: float = 0.1  # fraction of steps trained at the final shape


def cubic_fraction(step: int, total: int, warmup: float, cooldown: float) -> float:
    """How far (0..1) the kept counts have moved from full to target after `step` steps."""
    begin = round(total * warmup)
    end = max(begin + 1, round(total * (1.0 - cooldown)))
    progress = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return 1.0 - (1.0 - progress) ** 3


class LoRAPruner(TrainHooks):
    """Scores, moving average, schedule and masks of a LoRAPrune run; plugs into the training loop."""

    def __init__(self, model: nn.Module, structure: Structure, *, ratio: float, layers: list[int],
                 units: tuple[str, ...], head_unit: str, round_to: int | str, allocation: str,
                 settings: LoRAPruneSettings, total_steps: int):
        if settings.score not in SCORE_KINDS:
            from ..errors import UserError

            raise UserError(f"unknown --score '{settings.score}'; use {' or '.join(SCORE_KINDS)}")
        self.model = model
        self.structure = structure
        self.ratio, self.layers, self.units = ratio, layers, units
        self.head_unit, self.round_to, self.allocation = head_unit, round_to, allocation
        self.settings = settings
        self.total_steps = total_steps
        self.full = full_counts(structure, layers, head_unit)
        self.final: dict[int, KeepCounts] | None = (
            target_counts(structure, ratio, layers, units, head_unit, round_to) if allocation == "uniform" else None)
        self.average: list[LayerScores] | None = None
        self.counts = dict(self.full)
        self.masks = Masks()
        self.history: list[dict] = []  # per mask update: step, fraction, kept prunable share
        self._hooks = None

    # -- the moving average -------------------------------------------------------------------
    def _update_average(self, scores: list[LayerScores]) -> None:
        lam = self.settings.ema
        if self.average is None:
            self.average = [LayerScores(torch.zeros_like(s.q_heads), torch.zeros_like(s.kv_heads),
                                        torch.zeros_like(s.channels)) for s in scores]
        for avg, new in zip(self.average, scores):
            for field in ("q_heads", "kv_heads", "channels"):
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

    def update_masks(self, step_done: int, fraction: float | None = None) -> None:
        if self.final is None:  # global allocation: fixed once, from the scores at the first update
            self.final = global_counts(self.structure, self.average, self.ratio, self.layers, self.units,
                                       self.head_unit, self.round_to)
        if fraction is None:
            fraction = cubic_fraction(step_done, self.total_steps, self.settings.warmup, self.settings.cooldown)
        intermediate = {i: self.structure.layers[i].intermediate for i in self.layers}
        self.counts = interpolate_counts(self.full, self.final, fraction, self.round_to, intermediate, self.counts)
        self._apply(masks_from_counts(self.structure, self.average, self.counts, self.head_unit, self.masks))
        self.history.append({"step": step_done, "fraction": fraction, "kept": self.kept_share()})

    def kept_share(self) -> float:
        """Share of the prunable parameters the current masks keep."""
        from ..structure.allocate import achieved_ratio

        return 1.0 - achieved_ratio(self.structure, self.masks, self.layers, self.units)

    def finish(self) -> Masks:
        """Make sure the target is reached (short runs), take the hooks off, return the final masks."""
        if self.average is None:
            raise ValueError("no scores yet: LoRAPrune needs at least one training step")
        if self.counts != self.final:
            self.update_masks(self.total_steps, fraction=1.0)
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        return self.masks

    # -- TrainHooks -----------------------------------------------------------------------------
    def before_optimizer_step(self, step: int) -> None:
        self._update_average(lora_guided_scores(self.model, score=self.settings.score,
                                                normalize=self.settings.normalize))
        if self._due(step + 1):
            self.update_masks(step + 1)

    def state_dict(self) -> dict:
        return {
            "average": [vars(s).copy() for s in self.average] if self.average else None,
            "counts": {i: vars(c).copy() for i, c in self.counts.items()},
            "final": {i: vars(c).copy() for i, c in self.final.items()} if self.final else None,
            "masks": self.masks.kept_summary(self.structure),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.average = [LayerScores(**s) for s in state["average"]] if state["average"] else None
        self.counts = {int(i): KeepCounts(**c) for i, c in state["counts"].items()}
        self.final = {int(i): KeepCounts(**c) for i, c in state["final"].items()} if state["final"] else None
        self.history = list(state["history"])
        self._apply(Masks.from_summary(state["masks"], self.structure))
