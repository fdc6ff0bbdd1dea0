"""Magnitude: the L2 norm of all the weights that make up a unit (one projection at a time).

Scores are squared norms: they add across a unit's matrices (and across the query heads of a
key/value group) and rank units exactly as the norms do. Needs no data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..structure.units import decoder_layers, dense_weight, layer_projections, moe_parts, projection
from ..structure.scores import LayerScores


@torch.no_grad()
def magnitude_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *,
                     seed: int = 0) -> list[LayerScores]:
    """Squared weight norms per unit; `batches` and `seed` are accepted for a common signature and unused."""
    scores = []
    for layer in decoder_layers(model):
        layer_scores = LayerScores.from_weights(lambda name: dense_weight(projection(layer, name)).float().pow(2),
                                                layer.self_attn.head_dim, layer_projections(layer))
        moe = moe_parts(layer)
        if moe is not None:
            router, experts = moe
            layer_scores = layer_scores.with_experts(experts.gate_up_proj.detach().float().pow(2),
                                                     experts.down_proj.detach().float().pow(2),
                                                     router.weight.detach().float().pow(2))
        scores.append(layer_scores)
    return scores
