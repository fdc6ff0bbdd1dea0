"""LoRA through PEFT on the seven projections, and access to the adapter matrices."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..structure.units import PROJECTIONS, layer_projections, projection
from ..modeling import unwrap


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = PROJECTIONS
    # "float32": PEFT's default, adapters in fp32 and activations cast for every LoRA call;
    # "base": adapters in the base model's dtype (bf16 on a GPU), no casts, so faster on a GPU.
    dtype: str = "float32"

    def check(self) -> None:
        from ..errors import SettingError

        for name in ("r", "alpha"):
            if getattr(self, name) < 1:
                raise SettingError(f"LoraSettings.{name}",
                                   f"LoraSettings.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise SettingError("LoraSettings.dropout", f"LoraSettings.dropout is a probability in [0, 1), "
                               f"got {self.dropout}")
        if self.dtype not in LORA_DTYPES:
            raise SettingError("LoraSettings.dtype", f"unknown LoraSettings.dtype '{self.dtype}'; use "
                               f"{' or '.join(LORA_DTYPES)}")


LORA_DTYPES = ("float32", "base")


def add_lora(model: nn.Module, settings: LoraSettings | None = None, *, experts: bool = False) -> nn.Module:
    """Wrap `model` with a fresh LoRA adapter; only the adapter trains. With `experts`, a mixture of
    experts' fused expert parameters get one too (PEFT's `target_parameters`: a rank-r adapter per
    expert; PEFT allows no dropout there)."""
    from peft import LoraConfig, get_peft_model

    from ..families import family_of

    settings = settings or LoraSettings()
    settings.check()
    # A mixture of experts has no gate/up/down modules: PEFT would match those names against the experts'
    # fused parameters instead, so the adapter stays on the projections the family has.
    present = family_of(model).projection_names
    layout = family_of(model).moe
    parameters = ([f"{layout.experts_path}.gate_up_proj", f"{layout.experts_path}.down_proj"]
                  if experts and layout is not None else None)
    if parameters and settings.dropout:
        raise ValueError("LoRA on a mixture's expert parameters takes no dropout (PEFT's ParamWrapper)")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=[t for t in settings.targets if t in present], bias="none",
                        task_type="CAUSAL_LM", target_parameters=parameters)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=settings.dtype == "float32")
    if settings.dtype == "base":
        dtype = unwrap(peft_model).model.embed_tokens.weight.dtype
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
    return peft_model


@dataclass
class LoraMatrices:
    """One projection's adapter: y = W x + scaling * B (A x)."""

    name: str
    module: nn.Module
    A: nn.Parameter  # [r, in]
    B: nn.Parameter  # [out, r]
    scaling: float


def expert_adapters(layer: nn.Module) -> dict[str, nn.Module]:
    """A mixture-of-experts layer's LoRA wrappers of its fused expert parameters, by parameter name
    (`gate_up_proj`, `down_proj`; PEFT nests one wrapper per parameter around the experts module)."""
    from ..structure.units import moe_parts

    parts = moe_parts(layer)
    found, module = {}, parts[1] if parts is not None else None
    while module is not None and hasattr(module, "parameter_name") and hasattr(module, "lora_A"):
        found[module.parameter_name] = module
        module = module.base_layer
    return found


def lora_matrices(layer: nn.Module) -> Iterator[LoraMatrices]:
    """The active adapter of every LoRA-wrapped projection of a decoder layer."""
    for name in layer_projections(layer):
        module = projection(layer, name)
        if not hasattr(module, "lora_A"):
            continue
        (adapter,) = module.active_adapters
        yield LoraMatrices(name, module, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                           float(module.scaling[adapter]))
