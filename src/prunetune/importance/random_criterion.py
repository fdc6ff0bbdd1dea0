"""Random: uniform scores in [0, 1), the same for the same seed; a baseline that ignores the data."""

from __future__ import annotations

import torch
from torch import nn

from ..structure.units import Structure
from ..structure.scores import LayerScores


def random_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *, seed: int = 0) -> list[LayerScores]:
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for shape in Structure.of(model).layers:
        scores.append(LayerScores(
            q_heads=torch.rand(shape.num_heads, generator=generator),
            kv_heads=torch.rand(shape.num_kv_heads, generator=generator),
            channels=torch.rand(0 if shape.experts else shape.intermediate, generator=generator),
            experts=torch.rand(shape.experts, generator=generator) if shape.experts else None,
            expert_channels=torch.rand(shape.experts, shape.intermediate,
                                       generator=generator) if shape.experts else None,
        ))
    return scores
