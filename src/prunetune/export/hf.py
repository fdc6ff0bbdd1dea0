"""The Hugging Face form: save a pruned model so it loads again, with stock transformers wherever that is possible.

- Every layer the same shape: a standard checkpoint; `AutoModelForCausalLM.from_pretrained(dir)`
  loads it with no custom code. transformers 5 `LlamaConfig` refuses a head count that does not
  divide `hidden_size` even when `head_dim` is given (on save and on load), so such a Llama is
  saved as Mistral: the two share every weight name and compute the same function when Mistral's
  sliding window is off. Llama's optional attention/MLP biases have no Mistral counterpart; such a
  model needs `--round-to`/ratios that keep the head count a divisor of the hidden size.
- Layers of different shapes: the same files plus `prunetune_layer_shapes` in config.json; its
  top-level sizes are the widest layer's, so stock loading fails loudly on a size mismatch, and
  `prunetune.load_model(dir)` builds each layer at its own shape. Its `architectures` names
  prunetune's vLLM plugin class, so `vllm serve DIR` runs it with prunetune installed beside vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import UserError
from ..families import family_of
from ..layer_shapes import LAYER_SHAPES_KEY, is_uniform
from ..structure.surgery import dequantize, merge_lora, sync_config
from ..structure.units import Structure
from ..modeling import unwrap

# What a source format leaves in the config that means nothing in the saved model: the quantization
# of an 8-bit/NF4 base (the saved weights are de-quantized), and the name a GGUF file's metadata
# gave the model (transformers' GGUF loader keeps it as `_model_name_or_path`).
_LEFTOVERS = ("quantization_config", "_name_or_path", "_model_name_or_path")

# The architecture a per-layer model's config.json names: no stock engine can build layers of
# different shapes, so vLLM finds prunetune's plugin under this name (export/vllm_plugin.py);
# transformers reads model_type, not this, so the config still parses as Llama, Mistral or Qwen.
VLLM_ARCHITECTURE = "PrunetuneForCausalLM"
# The families that plugin builds (vLLM's Llama layer with per-layer sizes); another family's per-layer
# model keeps its own class name and loads through prunetune.load_model.
VLLM_PLUGIN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

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
    for stale in _LEFTOVERS:
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
        family = family_of(hf)
        family.join_fused(hf)  # written in the family's own layout (Phi-3's fused projections)
        try:
            hf.save_pretrained(out_dir)
        finally:
            family.split_fused(hf)
    if not is_uniform(config) and config.model_type in VLLM_PLUGIN_MODEL_TYPES:
        # save_pretrained writes the class's own name; the file names the plugin's
        path = Path(out_dir) / "config.json"
        saved = json.loads(path.read_text())
        saved["architectures"] = [VLLM_ARCHITECTURE]
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir)
    return hf, saved_as
