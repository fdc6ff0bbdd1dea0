"""Wanda-SP: structured Wanda (the FLAP paper's baseline), |W_ij| · ||X_j||₂ summed per unit.

X_j is the j-th input feature of a projection over every calibration token; its norm comes from
forward pre-hooks on the projections while the model runs on the calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..structure.units import PROJECTIONS, base_linear, decoder_layers, dense_weight, linear_shape, projection
from .calibration import require_batches, run_with_hooks
from ..structure.scores import LayerScores


def squared_input_sums(model: nn.Module, counting: Callable[[], bool] = lambda: True):
    """Forward pre-hooks on every projection that add up the squares of each input feature over all
    tokens (float32), while `counting()` says so. Returns the per-layer sums and the hooks' handles."""
    sums: list[dict[str, torch.Tensor]] = []
    handles = []

    def accumulate(acc: torch.Tensor):
        def hook(_module, args):
            if counting():
                x = args[0]
                acc.add_(x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0))
        return hook

    for layer in decoder_layers(model):
        sums.append({})
        for name in PROJECTIONS:
            module = projection(layer, name)
            device = base_linear(module).weight.device
            acc = sums[-1][name] = torch.zeros(linear_shape(module)[1], device=device)
            handles.append(module.register_forward_pre_hook(accumulate(acc)))
    return sums, handles


def input_norms(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per layer and projection, the L2 norm of each input feature over all tokens of all batches (float32)."""
    sums, handles = squared_input_sums(model)
    run_with_hooks(model, batches, handles)
    return [{name: s.sqrt() for name, s in layer.items()} for layer in sums]


def wanda_sp_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *, seed: int = 0) -> list[LayerScores]:
    batches = require_batches(batches, "wanda-sp")
    norms = input_norms(model, batches)
    scores = []
    with torch.no_grad():
        for layer, layer_norms in zip(decoder_layers(model), norms):
            def per_weight(name: str, layer=layer, layer_norms=layer_norms) -> torch.Tensor:
                weight = dense_weight(projection(layer, name)).float().abs()
                return weight * layer_norms[name].to(weight.device)[None, :]

            scores.append(LayerScores.from_weights(per_weight, layer.self_attn.head_dim))
    return scores
