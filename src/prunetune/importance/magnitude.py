"""Magnitude: the L2 norm of all the weights that make up a unit (one projection at a time).

Scores are squared norms: they add across a unit's matrices (and across the query heads of a
key/value group) and rank units exactly as the norms do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..structure.units import decoder_layers, dense_weight, projection, unit_sums
from .scores import LayerScores


@torch.no_grad()
def magnitude_scores(model: nn.Module, **_) -> list[LayerScores]:
    scores = []
    for layer in decoder_layers(model):
        head_dim = layer.self_attn.head_dim

        def sq(name: str) -> torch.Tensor:
            return unit_sums(name, dense_weight(projection(layer, name)).float().pow(2), head_dim)

        scores.append(LayerScores(
            q_heads=sq("q_proj") + sq("o_proj"),
            kv_heads=sq("k_proj") + sq("v_proj"),
            channels=sq("gate_proj") + sq("up_proj") + sq("down_proj"),
        ))
    return scores
