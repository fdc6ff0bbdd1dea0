"""Generic helpers on a transformers model that every floor may use: where the causal LM sits
inside the wrappers that training adds, and running it without dropout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers `*ForCausalLM` inside DDP and PEFT wrappers (or the model itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):  # what accelerate.prepare returns with processes
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run without dropout; every module's training flag comes back as it was."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
