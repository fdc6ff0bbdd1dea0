"""Scores of whole decoder layers and of residual (hidden) channels.

- `block_influence`: how much each decoder layer changes the residual stream it is given,
  1 − cos(input, output) averaged over the calibration tokens (ShortGPT's Block Influence, Men et
  al. 2024). A layer that barely turns its input is the cheapest to remove whole.
- `hidden_channel_scores`: Wanda-style, per residual channel c, the sum over every projection that
  reads the residual stream (q, k, v, gate, up of every layer) of ‖W[:, c]‖₂ · ‖X_c‖₂.
"""

from __future__ import annotations

import torch
from torch import nn

from ..structure.units import decoder_layers, dense_weight, projection
from .calibration import require_batches, run_with_hooks
from .wanda import input_norms

READS_RESIDUAL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def block_influence(model: nn.Module, batches: list[torch.Tensor] | None) -> torch.Tensor:
    """[num_layers] float32: mean over tokens of 1 − cos(layer input, layer output), read by forward
    hooks on the decoder layers during one pass over the calibration batches."""
    batches = require_batches(batches, "block influence")
    layers = decoder_layers(model)
    totals = torch.zeros(len(layers), dtype=torch.float64)

    def hook_for(i: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            totals[i] += float((1 - cos).sum())
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    run_with_hooks(model, batches, handles)
    return (totals / sum(b.numel() for b in batches)).float()


def hidden_channel_scores(model: nn.Module, batches: list[torch.Tensor] | None) -> torch.Tensor:
    """[hidden] float32: Σ over layers and the projections reading the residual stream of ‖W[:, c]‖·‖X_c‖."""
    batches = require_batches(batches, "hidden channel scores")
    norms = input_norms(model, batches)
    total = None
    with torch.no_grad():
        for layer, layer_norms in zip(decoder_layers(model), norms):
            for name in READS_RESIDUAL:
                weight = dense_weight(projection(layer, name)).float()
                part = weight.norm(dim=0).cpu() * layer_norms[name].cpu()
                total = part if total is None else total + part
    return total
