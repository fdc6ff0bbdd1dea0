"""What the data-driven criteria share: checking the calibration batches, and running the model on them."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..structure.units import base_linear
from ..modeling import eval_mode, unwrap

QUANTIZED_PARAMS = ("Int8Params", "Params4bit")


def require_batches(batches: list[torch.Tensor] | None, criterion: str) -> list[torch.Tensor]:
    if not batches:
        raise UserError(f"the {criterion} criterion needs calibration data: set PruneSettings.data")
    return list(batches)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether a projection's frozen weight is a bitsandbytes one (int8 or NF4)."""
    return type(base_linear(module).weight).__name__ in QUANTIZED_PARAMS


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device of the token embeddings."""
    return unwrap(model).get_input_embeddings().weight.device


def run_with_hooks(model: nn.Module, batches: list[torch.Tensor], handles: list) -> None:
    """Run the model on the batches (eval mode, no autograd) for the forward hooks whose `handles`
    are given, and take the hooks off afterwards, whatever happens."""
    try:
        device = input_device(model)
        with eval_mode(model), torch.inference_mode():
            for batch in batches:
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
