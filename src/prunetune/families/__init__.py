"""The model families prunetune prunes, one small module each, and how a model finds its family.

`family_of(model_or_config)` returns the `Family` (see base.py) for a model, a config, or a decoder
layer; `check_supported(config)` refuses every other model type with one line, before weights load.
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .base import PROJECTION_NAMES, Family, Fused
from .gemma import GEMMA2, GEMMA3
from .granite import GRANITE
from .llama import LLAMA, MISTRAL, QWEN2, QWEN3
from .moe import GRANITEMOE, MIXTRAL, OLMOE, PHIMOE, QWEN3_MOE
from .olmo import OLMO2
from .phi3 import PHI3
from .smollm3 import SMOLLM3

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, OLMO2, GRANITE, SMOLLM3,
                                MIXTRAL, QWEN3_MOE, OLMOE, PHIMOE, GRANITEMOE)
BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)

__all__ = ["BY_MODEL_TYPE", "FAMILIES", "PROJECTION_NAMES", "SUPPORTED_MODEL_TYPES", "Family", "Fused",
           "check_supported", "family_of", "prepare", "refuse_experts"]


# Families of the installed transformers that were tried and do not fit an adapter yet: what is missing.
NOT_YET = {
    "gemma4_text": "Gemma 4's layers add per-layer input embeddings (per_layer_input_gate, per_layer_projection) "
                   "and a value norm, which no prunetune adapter cuts yet",
    "qwen3_5_text": "Qwen3.5 mixes linear-attention (Gated DeltaNet) layers, which have no attention heads to prune",
    "llama4_text": "Llama 4 mixes dense and mixture-of-experts layers and adds a shared expert, which no prunetune "
                   "adapter cuts yet (prunetune prunes Mixtral, Qwen3-MoE, OLMoE, PhiMoE and GraniteMoE by "
                   "expert)",
    "gpt_oss": "gpt-oss stores its experts transposed with gate and up interleaved, adds expert and router biases "
               "and per-head attention sinks, which no prunetune adapter cuts yet (prunetune prunes Mixtral, "
               "Qwen3-MoE, OLMoE, PhiMoE and GraniteMoE by expert)",
    "qwen2_moe": "Qwen2-MoE adds a shared expert with its own gate, which no prunetune adapter cuts yet (prunetune "
                 "prunes Mixtral, Qwen3-MoE, OLMoE, PhiMoE and GraniteMoE by expert)",
}


def check_supported(config) -> Family:
    model_type = getattr(config, "model_type", None)
    family = BY_MODEL_TYPE.get(model_type)
    if model_type in NOT_YET:
        raise UserError(f"unsupported architecture '{model_type}': {NOT_YET[model_type]}")
    refusal = family.moe.refusal(config) if family is not None and family.moe is not None else None
    if refusal:
        raise UserError(f"unsupported {family.name} model: {refusal}")
    if family is None:
        names = ", ".join(f.name for f in FAMILIES)
        raise UserError(f"unsupported architecture '{model_type}'; prunetune prunes {names} "
                        f"(model types {', '.join(SUPPORTED_MODEL_TYPES)})")
    return family


def refuse_experts(config, what: str) -> None:
    """A one-line error for a method that does not prune mixtures of experts, naming the one that does."""
    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is not None and family.moe is not None:
        raise UserError(f"{family.name} is a mixture of experts, which {what} does not prune; prune it with "
                        "`prunetune prune` (LoRAPrune, or --method taylor, wanda-sp, magnitude, random), which "
                        "removes experts and their channels")


def prepare(model: nn.Module) -> nn.Module:
    """Make a transformers model of a supported family ready for prunetune, in place: fused projections
    split into the seven (`prunetune.load_model` does this; call it on a model you loaded yourself)."""
    from ..modeling import unwrap

    family_of(model).split_fused(unwrap(model))
    return model


def family_of(thing) -> Family:
    """The family of a model (any wrapper), its config, or one of its decoder layers."""
    config = _config_of(thing)
    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"no prunetune family for model type {getattr(config, 'model_type', None)!r}")
    return family


def _config_of(thing):
    if isinstance(thing, nn.Module):
        for candidate in (thing, getattr(thing, "self_attn", None)):
            config = getattr(candidate, "config", None)
            if config is not None and hasattr(config, "model_type"):
                return config
        from ..modeling import unwrap

        return unwrap(thing).config
    return thing
