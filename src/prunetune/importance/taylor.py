"""Taylor: LLM-Pruner's vanilla first-order criterion, |W ⊙ ∂L/∂W| summed per unit.

∂L/∂W is the sum over the calibration batches of the gradient of each batch's mean language-model
loss. Only the seven projection weights get gradients for this: every other parameter (embeddings,
norms, LoRA adapters) is frozen while it runs and everything is put back afterwards. Gradients
accumulate in the weights' own dtype, as a backward pass does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..structure.units import PROJECTIONS, base_linear, decoder_layers, dense_weight, projection
from .calibration import eval_mode, input_device, is_quantized_linear, require_batches
from .scores import LayerScores


def taylor_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *, seed: int = 0) -> list[LayerScores]:
    batches = require_batches(batches, "taylor")
    layers = decoder_layers(model)
    if any(is_quantized_linear(projection(layer, name)) for layer in layers for name in PROJECTIONS):
        raise UserError("the taylor criterion needs gradients of the weights and cannot run on a quantized "
                        "base; use loraprune or magnitude, or load the model without --quant")
    weights = [base_linear(projection(layer, name)).weight for layer in layers for name in PROJECTIONS]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    saved_grads = [w.grad for w in weights]
    device = input_device(model)
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                batch = batch.to(device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        scores = []
        for layer in layers:
            def per_weight(name: str, layer=layer) -> torch.Tensor:
                module = projection(layer, name)
                grad = base_linear(module).weight.grad
                if grad is None:  # the weight did not take part in the loss
                    return torch.zeros(dense_weight(module).shape)
                return (dense_weight(module).float() * grad.float()).abs()

            scores.append(LayerScores.from_weights(per_weight, layer.self_attn.head_dim))
        return scores
    finally:
        for w, grad in zip(weights, saved_grads):
            w.grad = grad
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
