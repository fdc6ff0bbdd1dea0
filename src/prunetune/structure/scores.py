"""Per-unit scores of one layer, and how they combine into the unit that is pruned.

Scores are additive: a unit made of several parts scores the sum of its parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .units import PROJECTIONS, unit_sums


@dataclass
class LayerScores:
    q_heads: torch.Tensor  # [num_heads]: q rows and o columns of each query head
    kv_heads: torch.Tensor  # [num_kv_heads]: k and v rows of each key/value head
    channels: torch.Tensor  # [intermediate]: gate and up rows, down column (empty in a mixture of experts)
    experts: torch.Tensor | None = None  # [experts]: each expert's weights and router row
    expert_channels: torch.Tensor | None = None  # [experts, width]: one expert's gate and up rows, down column

    def total(self) -> float:
        """The layer's whole score: heads, channels and experts (an expert through its channels)."""
        experts = float(self.expert_channels.sum()) if self.expert_channels is not None else 0.0
        return float(self.q_heads.sum() + self.kv_heads.sum() + self.channels.sum()) + experts

    def head_unit_scores(self, head_unit: str) -> torch.Tensor:
        """Scores of the pruned attention unit: [num_kv_heads] for kv-group, [num_heads] for q-head."""
        if head_unit == "kv-group":
            per_group = self.q_heads.reshape(len(self.kv_heads), -1).sum(dim=1)
            return per_group + self.kv_heads
        return self.q_heads

    @classmethod
    def from_weights(cls, per_weight: Callable[[str], torch.Tensor], head_dim: int,
                     names: tuple[str, ...] = PROJECTIONS) -> "LayerScores":
        """Scores from a per-weight score of each projection in `names` (a weight-shaped tensor), summed
        per unit."""

        return cls.from_projections({name: unit_sums(name, per_weight(name), head_dim).cpu() for name in names})

    @classmethod
    def from_projections(cls, units: dict[str, torch.Tensor]) -> "LayerScores":
        """Scores from each projection's unit sums: a query head is its q rows and o columns, a key/value
        head its k and v rows, a channel its gate and up rows and down column (no channels where the
        MLP is a mixture of experts: `with_experts` adds its units)."""
        mlp = [units[name] for name in ("gate_proj", "up_proj", "down_proj") if name in units]
        return cls(
            q_heads=units["q_proj"] + units["o_proj"],
            kv_heads=units["k_proj"] + units["v_proj"],
            channels=sum(mlp[1:], mlp[0]) if mlp else torch.zeros(0),
        )

    def with_experts(self, gate_up: torch.Tensor, down: torch.Tensor, router: torch.Tensor | None) -> "LayerScores":
        """These scores plus a mixture of experts' units, from per-weight scores of its parameters:
        `gate_up` [experts, 2 x width, hidden] (gate rows, then up rows), `down` [experts, hidden, width],
        `router` [experts, hidden] (None: the criterion does not score the router)."""
        gate_up, down = gate_up.float(), down.float()
        width = down.shape[2]
        per_row = gate_up.sum(dim=2)
        channels = per_row[:, :width] + per_row[:, width:] + down.sum(dim=1)
        experts = channels.sum(dim=1) + (router.float().sum(dim=1) if router is not None else 0)
        return LayerScores(self.q_heads, self.kv_heads, self.channels, experts.cpu(), channels.cpu())


SCORES_FILE = "unit_scores.safetensors"


SCORE_FIELDS = ("q_heads", "kv_heads", "channels", "experts", "expert_channels")


def save_scores(path, scores: list[LayerScores]) -> None:
    """Per-layer unit scores as safetensors (`layers.{i}.q_heads`, `.kv_heads`, `.channels`, and in a
    mixture of experts `.experts` and `.expert_channels`)."""
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{name}": getattr(s, name).float().contiguous()
               for i, s in enumerate(scores) for name in SCORE_FIELDS if getattr(s, name) is not None}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_scores(path) -> list[LayerScores]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    count = 1 + max(int(key.split(".")[1]) for key in tensors)
    return [LayerScores(*(tensors.get(f"layers.{i}.{name}") for name in SCORE_FIELDS)) for i in range(count)]
