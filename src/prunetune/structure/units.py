"""The prunable units of a decoder model, and where their weights live.

Every supported family has `model.embed_tokens`, `model.layers[i]`, `model.norm` and `lm_head`; where
the seven projections sit inside a layer, and which norms go with them, is the family's business
(`prunetune.families`): the core asks `projection(layer, name)` and never names a family.

Units:
  - attention: query heads (rows of q, columns of o) and key/value heads (rows of k and v). The
    default unit is one key/value head together with the query heads that share it ("kv-group");
    the alternative keeps every kv head and prunes equal numbers of query heads inside every group
    ("q-head").
  - MLP channel: one row of gate and up with the matching column of down.
  - hidden channel: one residual channel through the embeddings, every layer, the norms and lm_head.
  - layer: a whole decoder layer.
  - in a mixture-of-experts layer (Mixtral, Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE) the MLP's units are whole experts (its
    slices of the experts' gate_up and down parameters and its router row) and expert channels (one
    gate row, up row and down column of one expert); such a layer has no dense MLP channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..families import PROJECTION_NAMES, family_of
from ..modeling import unwrap

PROJECTIONS = PROJECTION_NAMES
ATTENTION_PROJECTIONS = PROJECTIONS[:4]
MLP_PROJECTIONS = PROJECTIONS[4:]
HEAD_UNITS = ("kv-group", "q-head")


def layer_projections(layer: nn.Module) -> tuple[str, ...]:
    """The projections a decoder layer has: the seven, or attention's four in a mixture of experts."""
    return family_of(layer).projection_names


def moe_parts(layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """A mixture-of-experts layer's router and experts modules, or None for a dense MLP. The experts
    module is transformers' own even under LoRA (PEFT nests one wrapper per adapted parameter around it)."""
    layout = family_of(layer).moe
    if layout is None:
        return None
    experts = layout.experts(layer)
    while hasattr(experts, "parameter_name") and hasattr(experts, "base_layer"):  # PEFT's ParamWrapper
        experts = experts.base_layer
    return layout.router(layer), experts


def expert_adapters(layer: nn.Module) -> dict[str, nn.Module]:
    """A mixture-of-experts layer's LoRA wrappers of its fused expert parameters, by parameter name
    (`gate_up_proj`, `down_proj`; PEFT nests one wrapper per parameter around the experts module)."""
    layout = family_of(layer).moe
    found, module = {}, layout.experts(layer) if layout is not None else None
    while module is not None and hasattr(module, "parameter_name") and hasattr(module, "lora_A"):
        found[module.parameter_name] = module
        module = module.base_layer
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return unwrap(model).model.layers


def projection(layer: nn.Module, name: str) -> nn.Module:
    """The module at a projection's place: a Linear, a bitsandbytes Linear, or a PEFT LoRA layer."""
    return family_of(layer).projection(layer, name)


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen linear under a PEFT LoRA layer (or the module itself)."""
    return getattr(module, "base_layer", module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    base = base_linear(module)
    return base.out_features, base.in_features


@dataclass(frozen=True)
class LayerShape:
    num_heads: int  # query heads
    num_kv_heads: int
    intermediate: int  # MLP channels; in a mixture of experts, each expert's width
    experts: int = 0  # experts in a mixture-of-experts layer; 0: a dense MLP

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def record(self) -> dict:
        """The shape as prunetune.json keeps it (`experts` only for a mixture of experts)."""
        fields = {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "intermediate": self.intermediate}
        return fields | ({"experts": self.experts} if self.experts else {})


@dataclass(frozen=True)
class Structure:
    """Shapes of a model as they are now (after any surgery), read from its modules."""

    model_type: str
    hidden: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int
    layers: tuple[LayerShape, ...]
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    head_norms: bool = False  # q/k norms over the whole projection (OLMo 2): a head's slice goes with it
    residual_norms: int = 2  # norms over the hidden size in each layer (Gemma 2 and 3: four)
    head_dim_norms: int = 0  # norms over one head's dimensions in each layer (Qwen3, Gemma 3: q and k)
    top_k: int = 0  # experts each token is routed to (mixtures of experts)

    @classmethod
    def of(cls, model: nn.Module) -> "Structure":
        hf = unwrap(model)
        config = hf.config
        layers = []
        head_dim = None
        for layer in hf.model.layers:
            head_dim = layer.self_attn.head_dim
            q_out, _ = linear_shape(projection(layer, "q_proj"))
            k_out, _ = linear_shape(projection(layer, "k_proj"))
            moe = moe_parts(layer)
            if moe is None:
                inter, _ = linear_shape(projection(layer, "gate_proj"))
                layers.append(LayerShape(q_out // head_dim, k_out // head_dim, inter))
            else:
                experts, _, inter = moe[1].down_proj.shape
                layers.append(LayerShape(q_out // head_dim, k_out // head_dim, inter, experts))
        if head_dim is None:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        first = hf.model.layers[0] if len(hf.model.layers) else None
        moe = family_of(hf).moe
        mlp_bias = first is not None and moe is None and base_linear(projection(first, "gate_proj")).bias is not None
        return cls(
            model_type=config.model_type,
            hidden=hf.model.embed_tokens.embedding_dim,
            head_dim=head_dim,
            vocab=hf.model.embed_tokens.num_embeddings,
            tied_embeddings=hf.lm_head.weight is hf.model.embed_tokens.weight,
            max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
            layers=tuple(layers),
            qkv_bias=first is not None and base_linear(projection(first, "q_proj")).bias is not None,
            o_bias=first is not None and base_linear(projection(first, "o_proj")).bias is not None,
            mlp_bias=mlp_bias,
            top_k=int(getattr(config, moe.top_k_key)) if moe is not None else 0,
            **family_fields(family_of(hf)),
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    # Parameters that go away with one unit (weights and the biases that belong to the unit).
    @property
    def params_per_q_head(self) -> int:
        return self.head_dim * (self.hidden + int(self.qkv_bias) + int(self.head_norms)) + self.head_dim * self.hidden

    @property
    def params_per_kv_head(self) -> int:
        return 2 * self.head_dim * (self.hidden + int(self.qkv_bias)) + self.head_dim * int(self.head_norms)

    @property
    def params_per_channel(self) -> int:
        return 3 * self.hidden + 2 * int(self.mlp_bias)

    def attention_params(self, shape: LayerShape) -> int:
        return shape.num_heads * self.params_per_q_head + shape.num_kv_heads * self.params_per_kv_head

    def expert_params(self, width: int) -> int:
        """An expert `width` channels wide, with its router row."""
        return width * self.params_per_channel + self.hidden

    def mlp_params(self, shape: LayerShape) -> int:
        if shape.experts:
            return shape.experts * self.expert_params(shape.intermediate)
        return shape.intermediate * self.params_per_channel

    def prunable_params(self, layer_indices=None, units=("heads", "channels")) -> int:
        """Parameters that scale with the given units of the given layers. A mixture of experts' MLP counts
        all its experts with `experts` or `expert-channels` (or `channels`, which depth.py passes for a
        whole layer; the width allocation never gets `channels` for such a model)."""
        indices = range(self.num_layers) if layer_indices is None else layer_indices
        mlp_kind = ("experts", "expert-channels")
        total = 0
        for i in indices:
            shape = self.layers[i]
            if "heads" in units:
                total += self.attention_params(shape)
            if "channels" in units or (shape.experts and any(u in units for u in mlp_kind)):
                total += self.mlp_params(shape)
        return total


def family_fields(family) -> dict:
    """What a Structure records of its family's norms (the parameters a layer holds besides projections)."""
    return {"head_norms": bool(family.projection_norms), "residual_norms": len(family.residual_norms),
            "head_dim_norms": len(family.head_dim_norms)}


def unit_sums(name: str, per_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum a per-weight tensor of one projection into its units.

    q/o -> one value per query head, k/v -> per key/value head, gate/up/down -> per MLP channel.
    Accepts a weight-shaped tensor [out, in] or a bias-shaped one [out]. Sums in float32.
    """
    t = per_weight.float()
    if name in ("q_proj", "k_proj", "v_proj"):
        rows = t.reshape(-1, head_dim, *t.shape[1:])
        return rows.reshape(rows.shape[0], -1).sum(dim=1)
    if name == "o_proj":
        return t.reshape(t.shape[0], -1, head_dim).sum(dim=(0, 2))
    if name in ("gate_proj", "up_proj"):
        return t.reshape(t.shape[0], -1).sum(dim=1)
    if name == "down_proj":
        return t.sum(dim=0)
    raise ValueError(f"not a prunable projection: {name}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-embedding parameter counts; tied weights count once, quantized ones by shape."""
    hf = unwrap(model)
    seen: set[int] = set()
    total = 0
    for module_name, module in hf.named_modules():
        if "lora_" in module_name:  # PEFT adapters are not part of the model being measured
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            quant_state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit packs two values a byte
            total += quant_state.shape.numel() if quant_state is not None else p.numel()
    embed = hf.model.embed_tokens.weight.numel()
    head = 0 if hf.lm_head.weight is hf.model.embed_tokens.weight else hf.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embed - head}


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight of a projection as a dense tensor (de-quantizing a bitsandbytes one)."""
    base = base_linear(module)
    if type(base.weight).__name__ not in ("Int8Params", "Params4bit"):
        return base.weight.detach()
    from peft.utils.integrations import dequantize_bnb_weight

    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes 0.50 repacks an NF4 weight in place on its first CPU forward without gradients
        # (CPUs with AVX512-BF16), and its de-quantization does not know that layout. Undo it, as
        # bitsandbytes itself does before saving; the next such forward packs again.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return dequantize_bnb_weight(weight, getattr(base, "state", None))
