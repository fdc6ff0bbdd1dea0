"""OLMo 2 (and OLMo 3, the same layer): no norm before attention or the MLP, one after each
(`post_attention_layernorm`, `post_feedforward_layernorm`), and q/k norms over the whole projection,
every head at once: a cut head takes its slice of the norm's weight, and while heads are only masked
the norm averages over the kept heads' rows, so the masked model computes what the cut one will."""

from .base import Family

OLMO2 = Family("OLMo 2", ("olmo2", "olmo3"), residual_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
               projection_norms={"q_proj": "self_attn.q_norm", "k_proj": "self_attn.k_norm"})
