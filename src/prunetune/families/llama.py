"""Llama and the families that kept its layout: Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms over
one head's dimensions, shared by every head)."""

from .base import Family

LLAMA = Family("Llama", ("llama",))
MISTRAL = Family("Mistral", ("mistral",))
QWEN2 = Family("Qwen2", ("qwen2",))
QWEN3 = Family("Qwen3", ("qwen3",), head_dim_norms=("self_attn.q_norm", "self_attn.k_norm"))
