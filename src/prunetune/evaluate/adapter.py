"""Saved PEFT LoRA adapters: whether one fits a model, read from file headers and the model's config
alone (no weights loaded, so a misfit is a one-line error before any heavy work), and loading one
on top of a model, unmerged."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..families.adapters import PEFT_PREFIX


def adapter_modules(path: str) -> dict[str, tuple[int, int]]:
    """The modules an adapter directory adapts, each with the (out, in) shape its LoRA expects."""
    directory = check_adapter_dir(path)
    safetensors_file, bin_file = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if safetensors_file.is_file():
        from ..models import tensor_shapes

        shapes = tensor_shapes(safetensors_file)  # a damaged file is one line, not a traceback
    elif bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
    else:
        raise UserError(f"adapter '{path}' has no adapter_model.safetensors or adapter_model.bin")
    halves: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        for half in ("lora_A", "lora_B"):
            if f".{half}." in key:
                halves.setdefault(key.split(f".{half}.")[0], {})[half] = shape
    modules = {name.removeprefix(PEFT_PREFIX): (ab["lora_B"][0], ab["lora_A"][1])
               for name, ab in halves.items() if len(ab) == 2}
    if not modules:
        raise UserError(f"adapter '{path}' holds no LoRA matrices (lora_A/lora_B weights)")
    return modules


def adapter_mismatch(modules: dict[str, tuple[int, int]], config) -> str | None:
    """None if every adapted module exists in a model of `config` with the expected shape; else why not."""
    from ..layer_shapes import empty_model

    model = empty_model(config)  # on the meta device: shapes only
    for name, (out_features, in_features) in sorted(modules.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return f"it has no module {name}"
        got = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if got != (out_features, in_features):
            return f"{name} is {got[0]}x{got[1]}, the adapter expects {out_features}x{in_features}"
    return None


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir).expanduser()
    if not (path / "adapter_config.json").is_file():
        what = "no such directory" if not path.exists() else "not a PEFT adapter directory (no adapter_config.json)"
        raise UserError(f"adapter '{adapter_dir}': {what}; pass a directory written by PEFT's save_pretrained")
    return path


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Put a saved PEFT adapter on top of `model`, unmerged, for inference."""
    from ..families.adapters import load_peft

    path = check_adapter_dir(adapter_dir)
    try:
        wrapped = load_peft(model, path, is_trainable=False)
    except RuntimeError as exc:  # size mismatch: the adapter was trained on a model of other shapes
        first = str(exc).strip().splitlines()
        reason = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise UserError(f"the adapter in '{adapter_dir}' does not fit this model ({reason[:200]}); "
                        "load it on the model it was trained on") from None
    return wrapped.eval()

