"""Wanda-SP: structured Wanda (the FLAP paper's baseline), |W_ij| · ||X_j||₂ summed per unit.

X_j is the j-th input feature of a projection over every calibration token; its norm comes from
forward pre-hooks on the projections while the model runs on the calibration batches. In a mixture of
experts each expert sees only the tokens routed to it: its gate and up rows are weighed by the norms
of those tokens' hidden states, its down columns by the norms of its own intermediate activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..structure.units import (base_linear, decoder_layers, dense_weight, layer_projections, linear_shape, moe_parts,
                               projection)
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
        for name in layer_projections(layer):
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


def _expert_input_sums(experts: nn.Module, sums: dict[str, torch.Tensor]):
    """A forward pre-hook on a mixture's experts that adds up, per expert, the squares of the hidden
    states routed to it (`inputs` [experts, hidden]) and of its intermediate activations (`middle`
    [experts, width])."""
    def hook(module, args):
        x, top_k_index = args[0].detach(), args[1]
        with torch.no_grad():
            for e in top_k_index.unique().tolist():
                routed = x[(top_k_index == e).any(dim=-1)].float()
                gate, up = nn.functional.linear(routed, module.gate_up_proj[e].float()).chunk(2, dim=-1)
                sums["inputs"][e] += routed.pow(2).sum(dim=0)
                sums["middle"][e] += (module.act_fn(gate) * up).pow(2).sum(dim=0)
    return hook


def wanda_sp_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *, seed: int = 0) -> list[LayerScores]:
    batches = require_batches(batches, "wanda-sp")
    expert_sums, handles = [], []
    for layer in decoder_layers(model):
        moe = moe_parts(layer)
        if moe is None:
            expert_sums.append(None)
            continue
        count, hidden, width = moe[1].down_proj.shape
        device = moe[1].down_proj.device
        expert_sums.append({"inputs": torch.zeros(count, hidden, device=device),
                            "middle": torch.zeros(count, width, device=device)})
        handles.append(moe[1].register_forward_pre_hook(_expert_input_sums(moe[1], expert_sums[-1])))
    try:
        norms = input_norms(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    scores = []
    with torch.no_grad():
        for layer, layer_norms, sums in zip(decoder_layers(model), norms, expert_sums):
            def per_weight(name: str, layer=layer, layer_norms=layer_norms) -> torch.Tensor:
                weight = dense_weight(projection(layer, name)).float().abs()
                return weight * layer_norms[name].to(weight.device)[None, :]

            layer_scores = LayerScores.from_weights(per_weight, layer.self_attn.head_dim, layer_projections(layer))
            if sums is not None:
                experts = moe_parts(layer)[1]
                inputs, middle = sums["inputs"].sqrt(), sums["middle"].sqrt()
                layer_scores = layer_scores.with_experts(
                    experts.gate_up_proj.detach().float().abs() * inputs[:, None, :],
                    experts.down_proj.detach().float().abs() * middle[:, None, :],
                    None)
            scores.append(layer_scores)
    return scores
