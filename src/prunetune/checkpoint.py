"""Save a pruned model so it loads again, with stock transformers wherever that is possible.

- Every layer the same shape: a standard checkpoint; `AutoModelForCausalLM.from_pretrained(dir)`
  loads it with no custom code. transformers 5 `LlamaConfig` refuses a head count that does not
  divide `hidden_size` even when `head_dim` is given (on save and on load), so such a Llama is
  saved as Mistral: the two share every weight name and compute the same function when Mistral's
  sliding window is off. Llama's optional attention/MLP biases have no Mistral counterpart; such a
  model needs `--round-to`/ratios that keep the head count a divisor of the hidden size.
- Layers of different shapes: the same files plus `prunetune_layer_shapes` in config.json; its
  top-level sizes are the widest layer's, so stock loading fails loudly on a size mismatch, and
  `prunetune.load_model(dir)` builds each layer at its own shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .models import LAYER_SHAPES_KEY
from .structure.surgery import dequantize, merge_lora, sync_config
from .structure.units import Structure, unwrap

# Fields a Llama config shares with Mistral's.
_MISTRAL_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "attention_dropout", LAYER_SHAPES_KEY,
)


def _needs_mistral_config(config, structure: Structure) -> bool:
    return config.model_type == "llama" and structure.hidden % config.num_attention_heads != 0


def _as_mistral_config(config, structure: Structure):
    from transformers import MistralConfig

    if structure.qkv_bias or structure.o_bias or structure.mlp_bias:
        raise UserError(
            f"this Llama has attention/MLP biases and {config.num_attention_heads} heads, which do not divide the "
            f"hidden size {structure.hidden}; stock transformers cannot load that shape. Choose a ratio or "
            "--head-unit that keeps the head count a divisor of the hidden size"
        )
    fields = config.to_dict()
    values = {k: fields[k] for k in _MISTRAL_FIELDS if k in fields}
    return MistralConfig(**values, sliding_window=None)


def save_model(model: nn.Module, tokenizer, out_dir: Path) -> tuple[nn.Module, str]:
    """Merge LoRA, de-quantize, and write model, config and tokenizer into `out_dir`.

    Returns the plain model (LoRA merged) and the architecture name it was saved under.
    """
    model = merge_lora(model)
    dequantize(model)
    sync_config(model)
    hf = unwrap(model)
    structure = Structure.of(hf)
    config = hf.config
    for stale in ("quantization_config", "_name_or_path"):
        if hasattr(config, stale):
            try:
                delattr(config, stale)
            except AttributeError:
                pass
    saved_as = config.model_type
    if _needs_mistral_config(config, structure):
        mistral = _as_mistral_config(config, structure)
        hf.config = mistral  # only while writing: the weights are written under the same names
        try:
            hf.save_pretrained(out_dir)
        finally:
            hf.config = config
        mistral.architectures = ["MistralForCausalLM"]  # save_pretrained stamped the Llama class name
        mistral.save_pretrained(out_dir)
        saved_as = "mistral"
    else:
        hf.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return hf, saved_as


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
    hidden = config.hidden_size
    for layer, shape in zip(model.model.layers, shapes):
        attn, mlp = layer.self_attn, layer.mlp
        q, kv, inter = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
        hd = attn.head_dim
        for parent, name, out_f, in_f in (
            (attn, "q_proj", q * hd, hidden), (attn, "k_proj", kv * hd, hidden), (attn, "v_proj", kv * hd, hidden),
            (attn, "o_proj", hidden, q * hd), (mlp, "gate_proj", inter, hidden), (mlp, "up_proj", inter, hidden),
            (mlp, "down_proj", hidden, inter),
        ):
            old = getattr(parent, name)
            setattr(parent, name, nn.Linear(in_f, out_f, bias=old.bias is not None, device="meta", dtype=dtype))
        attn.num_key_value_groups = q // kv
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
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
        raise UserError(f"weights in '{path}' do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
