"""Random: uniform scores in [0, 1), the same for the same seed; a baseline that ignores the data."""

from __future__ import annotations

import torch
from torch import nn

from ..structure.units import decoder_layers, linear_shape, projection
from ..structure.scores import LayerScores


def random_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *, seed: int = 0) -> list[LayerScores]:
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for layer in decoder_layers(model):
        head_dim = layer.self_attn.head_dim
        num_heads = linear_shape(projection(layer, "q_proj"))[0] // head_dim
        num_kv_heads = linear_shape(projection(layer, "k_proj"))[0] // head_dim
        intermediate = linear_shape(projection(layer, "gate_proj"))[0]
        scores.append(LayerScores(
            q_heads=torch.rand(num_heads, generator=generator),
            kv_heads=torch.rand(num_kv_heads, generator=generator),
            channels=torch.rand(intermediate, generator=generator),
        ))
    return scores
