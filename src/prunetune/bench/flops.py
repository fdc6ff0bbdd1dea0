"""FLOPs of a prefill, from a model's actual per-layer shapes."""

from __future__ import annotations

from collections.abc import Iterable

from ..structure.units import Structure


def prefill_flops(structure: Structure, tokens: int, batch: int = 1,
                  lora: Iterable[tuple[int, int, int]] = (), logits_tokens: int = 1) -> int:
    """2 × the multiply-adds of the matrix products of one forward pass over `tokens` tokens.

    Counted, for each of the `batch` sequences: every linear layer of every decoder layer at its
    own shape (q, k, v, o; gate, up, down) for every token; attention scores (Q·Kᵀ) and the
    weighted sum of values over the causal pairs, tokens·(tokens+1)/2 per query head, as causal
    kernels compute them; each unmerged LoRA (r, in, out) as its A and B products for every token;
    `lm_head` for the last `logits_tokens` positions (generation needs only the last). Not
    counted: norms, RoPE, activations, residual adds, softmax (elementwise, not matrix products).
    """
    t, hidden, head_dim = tokens, structure.hidden, structure.head_dim
    pairs = t * (t + 1) // 2
    total = 0
    for shape in structure.layers:
        q, kv = shape.num_heads * head_dim, shape.num_kv_heads * head_dim
        total += 2 * t * hidden * (q + 2 * kv)  # q, k, v projections
        total += 2 * t * q * hidden  # o projection
        total += 2 * 2 * pairs * head_dim * shape.num_heads  # Q·Kᵀ and scores·V
        total += 3 * 2 * t * hidden * shape.intermediate  # gate, up, down
    total += sum(2 * t * r * (n_in + n_out) for r, n_in, n_out in lora)
    total += 2 * logits_tokens * hidden * structure.vocab  # lm_head
    return batch * total
