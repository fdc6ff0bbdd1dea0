"""Gemma 2 and Gemma 3 (text): Llama's projections, two more norms around the MLP
(`pre_feedforward_layernorm`, `post_feedforward_layernorm`), and Gemma 3's q/k norms over one head's
dimensions. Both multiply the embeddings by the square root of the hidden size, which the model reads
from its config: cutting hidden channels would change that factor, so they are refused."""

from .base import Family

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_SCALED = ("it multiplies its embeddings by the square root of the hidden size; prune heads, channels or layers "
           "instead")

GEMMA2 = Family("Gemma 2", ("gemma2",), residual_norms=_NORMS, no_hidden_cut=_SCALED)
GEMMA3 = Family("Gemma 3", ("gemma3_text",), residual_norms=_NORMS,
                head_dim_norms=("self_attn.q_norm", "self_attn.k_norm"), no_hidden_cut=_SCALED)
