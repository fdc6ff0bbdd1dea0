"""vLLM model for prunetune outputs whose decoder layers have different shapes.

config.json of such an output says `"architectures": ["PrunetuneForCausalLM"]`, keeps its family's
`model_type` (llama, mistral, qwen2, qwen3) and lists each layer's query heads, key/value heads and
MLP width under `prunetune_layer_shapes` (top-level sizes are the widest layer's). This is vLLM's own
Llama model with one change: each decoder layer is built from a shallow copy of the config that
carries that layer's sizes. Everything else (parallel linear layers, paged attention, RoPE and its
scaling, RMSNorm, tied embeddings, weight loading with q/k/v and gate/up stacking, tensor and
pipeline parallelism) is vLLM's. vLLM's v1 KV cache keeps one spec per layer (its
`UniformTypeKVCacheSpecs` group), so layers keep their own number of key/value heads: no padding.

Families: Llama and Mistral (HF-format Mistral is Llama in vLLM), Qwen2 (bias on q/k/v, none on o),
Qwen3 (per-head RMSNorm on q and k before RoPE). Weights are HF's names at each layer's own shape.
vLLM imports this module in its processes (the plugin registers it lazily); prunetune never does.
"""

from __future__ import annotations

import copy

import torch
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from prunetune.layer_shapes import LAYER_SHAPES_KEY


def layer_config(config, index: int):
    """A shallow copy of `config` with layer `index`'s heads, key/value heads and MLP width.

    head_dim is pinned first (the top-level head count is the widest layer's, not the source's, so
    hidden_size // heads would be wrong where a family derives it); Qwen2's q/k/v bias is spelled the
    way vLLM's Llama layer reads it (`qkv_bias` for q/k/v, `attention_bias` for o)."""
    shapes = getattr(config, LAYER_SHAPES_KEY, None)
    if not shapes:
        raise ValueError(f"PrunetuneForCausalLM needs `{LAYER_SHAPES_KEY}` in config.json")
    if len(shapes) != config.num_hidden_layers:
        raise ValueError(f"config.json lists {len(shapes)} layer shapes for {config.num_hidden_layers} layers")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer = copy.copy(config)
    layer.head_dim = head_dim
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        setattr(layer, key, int(shapes[index][key]))
    if config.model_type == "qwen2":
        layer.qkv_bias, layer.attention_bias = True, False
    return layer


class PrunetuneAttention(LlamaAttention):
    """Llama attention, plus Qwen3's per-head q/k RMSNorm (applied before RoPE, as Qwen3 does)."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.qk_norm:
            return super().forward(positions, hidden_states)
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class PrunetuneDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer, built at its own layer's sizes (its index is in `prefix`)."""

    def __init__(self, vllm_config, prefix: str = "", config=None, attn_layer_type=PrunetuneAttention) -> None:
        config = config or vllm_config.model_config.hf_config
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         config=layer_config(config, extract_layer_index(prefix)),
                         attn_layer_type=attn_layer_type)


class PrunetuneForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with per-layer shapes (embeddings, final norm, LM head, loading: Llama's)."""

    def __init__(self, *, vllm_config, prefix: str = "", layer_type=PrunetuneDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
