"""Taylor: LLM-Pruner's vanilla first-order criterion, |W ⊙ ∂L/∂W| summed per unit.

∂L/∂W is the sum over the calibration batches of the gradient of each batch's mean language-model
loss. Only the seven projection weights get gradients for this: every other parameter (embeddings,
norms, LoRA adapters) is frozen while it runs and everything is put back afterwards. Gradients
accumulate in the weights' own dtype, as a backward pass does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError
from ..structure.units import base_linear, decoder_layers, dense_weight, layer_projections, moe_parts, projection
from ..modeling import eval_mode
from .calibration import input_device, is_quantized_linear, require_batches
from ..structure.scores import LayerScores


def quantized_refusal(model: nn.Module, what: str) -> None:
    if any(is_quantized_linear(projection(layer, name)) for layer in decoder_layers(model)
           for name in layer_projections(layer)):
        raise UserError(f"{what} needs gradients of the weights and cannot run on a quantized base; "
                        "use loraprune or magnitude, or load the model without RunOptions.quant")


@contextmanager
def weight_gradients(model: nn.Module, batches: list[torch.Tensor], *, also: list[torch.Tensor] = (),
                     mean: bool = False) -> Iterator[None]:
    """Back-propagate the batches with only the projection weights (a mixture of experts': the router's
    and the experts' parameters; and `also`) requiring grad.

    Inside the block their `.grad` holds the sum (or, with `mean`, the mean) over the batches of the
    gradient of each batch's mean loss. Afterwards every flag and earlier gradient is as it was.
    """
    trained = scored_weights(model) + list(also)
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in trained]
    device = input_device(model)
    try:
        for p in params:
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
            p.grad = None
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss / len(batches) if mean else loss).backward()
        yield
    finally:
        for p, grad in zip(trained, saved_grads):
            p.grad = grad
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)


def scored_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights Taylor back-propagates to: every projection's, and a mixture's router and experts."""
    layers = decoder_layers(model)
    weights = [base_linear(projection(layer, name)).weight for layer in layers for name in layer_projections(layer)]
    return weights + [p for layer in layers for p in _expert_params(layer)]


def _expert_params(layer: nn.Module) -> list[nn.Parameter]:
    moe = moe_parts(layer)
    return [] if moe is None else [moe[0].weight, moe[1].gate_up_proj, moe[1].down_proj]


def _weight_times_grad(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:  # the weight did not take part in the loss
        return torch.zeros(weight.shape)
    return (weight.detach().float() * grad.float()).abs()


def scores_from_weight_gradients(model: nn.Module) -> list[LayerScores]:
    """|W ⊙ ∂L/∂W| per unit, from the gradients now on the projection (and expert) weights."""
    scores = []
    for layer in decoder_layers(model):
        def per_weight(name: str, layer=layer) -> torch.Tensor:
            module = projection(layer, name)
            return _weight_times_grad(dense_weight(module), base_linear(module).weight.grad)

        layer_scores = LayerScores.from_weights(per_weight, layer.self_attn.head_dim, layer_projections(layer))
        if moe_parts(layer) is not None:
            router, gate_up, down = (_weight_times_grad(p, p.grad) for p in _expert_params(layer))
            layer_scores = layer_scores.with_experts(gate_up, down, router)
        scores.append(layer_scores)
    return scores


def taylor_scores(model: nn.Module, batches: list[torch.Tensor] | None = None, *, seed: int = 0) -> list[LayerScores]:
    batches = require_batches(batches, "taylor")
    quantized_refusal(model, "the taylor criterion")
    with weight_gradients(model, batches):
        return scores_from_weight_gradients(model)
