"""LoRA through PEFT on the seven projections, and access to the adapter matrices."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from torch import nn

from ..structure.units import PROJECTIONS, layer_projections, projection
from ..modeling import unwrap


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    # None: DEFAULT_DROPOUT, or 0 where the adapter also covers a mixture's fused expert parameters
    # (PEFT applies no dropout there, and one config holds one dropout for every module).
    dropout: float | None = None
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
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise SettingError("LoraSettings.dropout", f"LoraSettings.dropout is a probability in [0, 1), "
                               f"got {self.dropout}")
        if self.dtype not in LORA_DTYPES:
            raise SettingError("LoraSettings.dtype", f"unknown LoraSettings.dtype '{self.dtype}'; use "
                               f"{' or '.join(LORA_DTYPES)}")


    def resolved(self, experts: bool = False) -> "LoraSettings":
        """These settings with the dropout decided: for an adapter on the experts too if `experts`."""
        from ..errors import SettingError

        if self.dropout is None:
            return replace(self, dropout=0.0 if experts else DEFAULT_DROPOUT)
        if experts and self.dropout:
            raise SettingError("LoraSettings.dropout", "LoRA on a mixture's experts takes no dropout (PEFT applies "
                               f"none to a fused expert parameter), got {self.dropout}: leave LoraSettings.dropout "
                               "unset or 0")
        return self


LORA_DTYPES = ("float32", "base")
DEFAULT_DROPOUT = 0.05


def add_lora(model: nn.Module, settings: LoraSettings | None = None, *, experts: bool = False) -> nn.Module:
    """Wrap `model` with a fresh LoRA adapter; only the adapter trains. With `experts`, a mixture of
    experts' fused expert parameters get one too (PEFT's `target_parameters`: a rank-r adapter per
    expert; PEFT allows no dropout there, so the dropout left unset is 0)."""
    from peft import LoraConfig, get_peft_model

    from ..families import family_of

    # A mixture of experts has no gate/up/down modules: PEFT would match those names against the experts'
    # fused parameters instead, so the adapter stays on the projections the family has.
    present = family_of(model).projection_names
    layout = family_of(model).moe
    parameters = ([f"{layout.experts_path}.gate_up_proj", f"{layout.experts_path}.down_proj"]
                  if experts and layout is not None else None)
    settings = (settings or LoraSettings()).resolved(experts=bool(parameters))
    settings.check()
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


def lora_matrices(layer: nn.Module) -> Iterator[LoraMatrices]:
    """The active adapter of every LoRA-wrapped projection of a decoder layer."""
    for name in layer_projections(layer):
        module = projection(layer, name)
        if not hasattr(module, "lora_A"):
            continue
        (adapter,) = module.active_adapters
        yield LoraMatrices(name, module, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                           float(module.scaling[adapter]))
