"""Models whose decoder layers have different shapes (the output of per-layer pruning).

config.json lists each layer's query heads, key/value heads and MLP width under
`prunetune_layer_shapes`; its top-level sizes are the widest layer's, so stock loading fails loudly on
a size mismatch, and `prunetune.load_model(dir)` builds each layer at its own shape. This module is
the loading side only (saving is `prunetune.export.hf`), so loading never imports saving.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .families import family_of

LAYER_SHAPES_KEY = "prunetune_layer_shapes"


def layer_shapes(config) -> list[dict]:
    """Each decoder layer's `num_attention_heads`, `num_key_value_heads` and `intermediate_size`,
    whether the config lists them per layer or the model is uniform."""
    shapes = getattr(config, LAYER_SHAPES_KEY, None)
    if shapes:
        return [dict(shape) for shape in shapes]
    return [{"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
             "intermediate_size": config.intermediate_size} for _ in range(config.num_hidden_layers)]


def is_uniform(config) -> bool:
    """Whether every layer has one shape (what stock engines assume)."""
    shapes = layer_shapes(config)
    return all(shape == shapes[0] for shape in shapes)


def empty_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of `config` with its parameters on the meta device (no memory, no weights), every
    layer at its own shape where config.json lists `prunetune_layer_shapes`; buffers (RoPE) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shapes = getattr(config, LAYER_SHAPES_KEY, None)
    if not shapes:
        return model
    if len(shapes) != len(model.model.layers):
        raise UserError(f"config.json lists {len(shapes)} layer shapes for {len(model.model.layers)} layers")
    family = family_of(config)
    hidden = config.hidden_size
    for layer, shape in zip(model.model.layers, shapes):
        q, kv, inter = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
        hd = layer.self_attn.head_dim
        sizes = {"q_proj": (q * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
                 "o_proj": (hidden, q * hd), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                 "down_proj": (hidden, inter)}
        for name, (out_f, in_f) in sizes.items():
            parent, attr = family.projection_owner(layer, name)
            old = getattr(parent, attr)
            setattr(parent, attr, nn.Linear(in_f, out_f, bias=old.bias is not None, device="meta", dtype=dtype))
            norm = family.projection_norm(layer, name)  # OLMo 2: a norm as wide as the projection
            if norm is not None:
                norm.weight = nn.Parameter(torch.empty(out_f, device="meta", dtype=dtype))
        family.after_cut(layer, q, kv, inter)
    return model


def load_nonuniform(path: str, config, dtype: torch.dtype) -> nn.Module:
    """Build a model whose layers have different shapes and load its weights."""
    from safetensors.torch import load_file

    model = empty_model(config, dtype)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("model*.safetensors")):  # not other files, e.g. unit_scores.safetensors
        state.update(load_file(str(file)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"weights in '{path}' do not match its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
