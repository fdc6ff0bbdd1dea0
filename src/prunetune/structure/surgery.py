"""Physically remove masked units: from base weights and from LoRA A/B alike, then fix the config.

`cut(model, masks)` works in place on a plain transformers model or on a PEFT-wrapped one. A
bitsandbytes-quantized base is de-quantized first (a cut model is a dense model). LoRA matrices
follow their base weight: rows cut from W are cut from B, columns cut from W are cut from A, so
W' + s·B'·A' is exactly the kept block of W + s·B·A and merging before or after the cut agree.
The one exception is LoRA on a mixture's fused expert parameters (one adapter per expert, inside
PEFT's ParamWrapper): `cut` folds those into the experts' weights first, then cuts the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import family_of
from ..layer_shapes import LAYER_SHAPES_KEY
from ..modeling import unwrap
from .experts import cut_experts, sync_expert_config
from .masks import Masks
from .units import (Structure, base_linear, dense_weight, expert_adapters, layer_projections, linear_shape, moe_parts,
                    projection)


def _replace_param(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _slice_linear(linear: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    weight = linear.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        if linear.bias is not None:
            _replace_param(linear, "bias", linear.bias.data.index_select(0, rows.to(weight.device)))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    _replace_param(linear, "weight", weight)
    linear.out_features, linear.in_features = weight.shape


def slice_projection(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep `rows` (output features) and `cols` (input features) of a projection and its LoRA."""
    base = base_linear(module)
    _slice_linear(base, rows, cols)
    if base is module:
        return
    if getattr(module, "lora_magnitude_vector", None):
        raise ValueError("pruning DoRA adapters is not supported")
    for lora_a in module.lora_A.values():
        _slice_linear(lora_a, None, cols)
    for lora_b in module.lora_B.values():
        _slice_linear(lora_b, rows, None)
    module.out_features, module.in_features = base.out_features, base.in_features


def _head_rows(keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    return keep.repeat_interleave(head_dim).nonzero().flatten()


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes linear (also under a LoRA layer) by an nn.Linear, in place."""
    hf = unwrap(model)
    family = family_of(hf)
    for layer in hf.model.layers:
        for name in layer_projections(layer):
            module = projection(layer, name)
            owner, attr = ((module, "base_layer") if hasattr(module, "base_layer")
                           else family.projection_owner(layer, name))
            quantized = getattr(owner, attr)
            kind = type(quantized.weight).__name__
            if kind not in ("Int8Params", "Params4bit"):
                continue
            dtype = getattr(quantized, "compute_dtype", None) or (
                quantized.bias.dtype if quantized.bias is not None else hf.model.embed_tokens.weight.dtype)
            weight = dense_weight(quantized).to(dtype)
            dense = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                              device=weight.device, dtype=dtype)
            dense.weight = nn.Parameter(weight, requires_grad=False)
            if quantized.bias is not None:
                dense.bias = nn.Parameter(quantized.bias.data.to(dtype), requires_grad=False)
            setattr(owner, attr, dense)
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.is_quantized = False
    for attr in ("is_loaded_in_8bit", "is_loaded_in_4bit", "hf_quantizer"):
        if hasattr(hf, attr):
            setattr(hf, attr, None if attr == "hf_quantizer" else False)
    return model


def cut(model: nn.Module, masks: Masks) -> nn.Module:
    """Remove every unit the masks drop; masks are indexed by the model's current layer numbers."""
    structure = Structure.of(model)
    masks.validate(structure)
    hf = unwrap(model)
    family = family_of(hf)
    if masks.hidden is not None and not masks.hidden.all() and family.no_hidden_cut:
        raise ValueError(f"{family.name}'s hidden channels cannot be cut: {family.no_hidden_cut}")
    if family.no_head_cut and any(not keep.all() for keep in masks.heads.values()):
        raise ValueError(f"{family.name}'s attention heads cannot be cut: {family.no_head_cut}")
    dequantize(model)
    merge_expert_lora(model)
    layers = hf.model.layers

    for i, layer in enumerate(layers):
        head_dim = layer.self_attn.head_dim
        heads = masks.heads.get(i)
        if heads is not None and not heads.all():
            kv = masks.kv_heads(i, structure)
            rows = {"q_proj": _head_rows(heads, head_dim), "k_proj": _head_rows(kv, head_dim),
                    "v_proj": _head_rows(kv, head_dim)}
            for name, kept_rows in rows.items():
                slice_projection(projection(layer, name), rows=kept_rows)
                norm = family.projection_norm(layer, name)  # OLMo 2: a norm over the whole projection
                if norm is not None:
                    _replace_param(norm, "weight", norm.weight.data.index_select(0, kept_rows.to(norm.weight.device)))
            slice_projection(projection(layer, "o_proj"), cols=rows["q_proj"])
        channels = masks.channels.get(i)
        if channels is not None and not channels.all():
            keep = channels.nonzero().flatten()
            slice_projection(projection(layer, "gate_proj"), rows=keep)
            slice_projection(projection(layer, "up_proj"), rows=keep)
            slice_projection(projection(layer, "down_proj"), cols=keep)
        if structure.layers[i].experts:
            if i in masks.experts or i in masks.expert_channels:
                cut_experts(layer, masks.experts.get(i), masks.expert_channels.get(i))
            channels_now = moe_parts(layer)[1].down_proj.shape[2]
        else:
            channels_now = linear_shape(projection(layer, "gate_proj"))[0]
        q_rows, k_rows = (linear_shape(projection(layer, n))[0] for n in ("q_proj", "k_proj"))
        family.after_cut(layer, q_rows // head_dim, k_rows // head_dim, channels_now)

    if masks.hidden is not None and not masks.hidden.all():
        _cut_hidden(hf, masks.hidden.nonzero().flatten())

    if masks.layers is not None and not masks.layers.all():
        kept = [layer for i, layer in enumerate(layers) if masks.layers[i]]
        hf.model.layers = nn.ModuleList(kept)
        for new_index, layer in enumerate(kept):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = new_index
        family.cut_layer_lists(hf.config, masks.layers.tolist())

    sync_config(model)
    return model


def _cut_hidden(hf: nn.Module, keep: torch.Tensor) -> None:
    tied = hf.lm_head.weight is hf.model.embed_tokens.weight
    embed = hf.model.embed_tokens
    _replace_param(embed, "weight", embed.weight.data.index_select(1, keep.to(embed.weight.device)))
    embed.embedding_dim = len(keep)
    norms = [hf.model.norm]
    for layer in hf.model.layers:
        norms += family_of(hf).norms_over_residual(layer)
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            slice_projection(projection(layer, name), cols=keep)
        for name in ("o_proj", "down_proj"):
            slice_projection(projection(layer, name), rows=keep)
        if hasattr(layer.mlp, "hidden_size"):
            layer.mlp.hidden_size = len(keep)
        if hasattr(layer, "hidden_size"):
            layer.hidden_size = len(keep)
    for norm in norms:
        _replace_param(norm, "weight", norm.weight.data.index_select(0, keep.to(norm.weight.device)))
    if tied:
        hf.lm_head.weight = embed.weight
    else:
        slice_projection(hf.lm_head, cols=keep)


def sync_config(model: nn.Module) -> None:
    """Make the config describe the modules as they now are."""
    hf = unwrap(model)
    structure = Structure.of(model)
    config = hf.config
    config.hidden_size = structure.hidden
    config.num_hidden_layers = structure.num_layers
    config.head_dim = structure.head_dim
    shapes = structure.layers
    if structure.uniform:
        if hasattr(config, LAYER_SHAPES_KEY):
            delattr(config, LAYER_SHAPES_KEY)
    else:
        setattr(config, LAYER_SHAPES_KEY, [
            {"num_attention_heads": s.num_heads, "num_key_value_heads": s.num_kv_heads,
             "intermediate_size": s.intermediate}
            for s in shapes
        ])
    if shapes:
        # Non-uniform models record the widest layer at the top level: stock loading then fails
        # loudly with a size mismatch instead of building something wrong.
        config.num_attention_heads = max(s.num_heads for s in shapes)
        config.num_key_value_heads = max(s.num_kv_heads for s in shapes)
        if not shapes[0].experts:  # a mixture of experts keeps its width under its own key (families/moe.py)
            config.intermediate_size = max(s.intermediate for s in shapes)
    sync_expert_config(hf, structure)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights (W += s·B·A) and return the plain transformers model.

    Done here rather than by PEFT's merge_and_unload because after a cut the base of a LoRA layer
    created on a quantized model is a plain Linear, which PEFT's bitsandbytes merge cannot handle.
    """
    if not hasattr(model, "get_base_model"):
        return model
    dequantize(model)
    merge_expert_lora(model)
    hf = model.get_base_model()
    family = family_of(hf)
    for layer in hf.model.layers:
        for name in layer_projections(layer):
            module = projection(layer, name)
            if not hasattr(module, "base_layer"):
                continue
            base = module.base_layer
            with torch.no_grad():
                for adapter in module.active_adapters:
                    base.weight += module.get_delta_weight(adapter).to(base.weight.dtype)
            setattr(*family.projection_owner(layer, name), base)
    return hf


def merge_expert_lora(model: nn.Module) -> None:
    """Fold the adapters of a mixture's fused expert parameters into them (W += s·B·A, expert by expert)
    and put transformers' experts module back in place of PEFT's wrappers."""
    layout = family_of(unwrap(model)).moe
    if layout is None:
        return
    for layer in unwrap(model).model.layers:
        wrappers = expert_adapters(layer)
        if not wrappers:
            continue
        experts = moe_parts(layer)[1]
        with torch.no_grad():
            for name, wrapper in wrappers.items():
                param = getattr(experts, name)
                for adapter in wrapper.active_adapters:
                    param += wrapper.get_delta_weight(adapter).to(param.dtype)
        owner_path, _, attribute = layout.experts_path.rpartition(".")
        setattr(layer.get_submodule(owner_path), attribute, experts)
