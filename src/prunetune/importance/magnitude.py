"""Magnitude: the L2 norm of all the weights that make up a unit (one projection at a time).

Scores are squared norms: they add across a unit's matrices (and across the query heads of a
key/value group) and rank units exactly as the norms do. Needs no data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..structure.units import decoder_layers, dense_weight, projection
from ..structure.scores import LayerScores


@torch.no_grad()
def magnitude_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *, seed: int = 0) -> list[LayerScores]:
    """Squared weight norms per unit; `batches` and `seed` are accepted for a common signature and unused."""
    return [
        LayerScores.from_weights(lambda name: dense_weight(projection(layer, name)).float().pow(2),
                                 layer.self_attn.head_dim)
        for layer in decoder_layers(model)
    ]
