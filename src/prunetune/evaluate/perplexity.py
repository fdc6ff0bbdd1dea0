"""Perplexity over non-overlapping windows, the protocol of the pruning papers' tables.

The split's text is joined with blank lines and tokenised once, cut into windows of `seq_len`
tokens (the tail that does not fill a window is dropped), and every window is scored on its own:
its first token is context only. Perplexity is exp(total NLL / tokens scored).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataSpec, load_blocks
from ..errors import UserError
from ..progress import track
from ..structure.units import Structure


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    data: str
    split: str
    seq_len: int
    windows: int
    tokens_scored: int
    seconds: float

    @property
    def protocol(self) -> str:
        return (f"{self.data} {self.split} split joined with blank lines; non-overlapping "
                f"{self.seq_len}-token windows, "
                f"{self.windows} windows, {self.tokens_scored:,} tokens scored (first token of each window is context)")

    def to_dict(self) -> dict:
        return asdict(self) | {"protocol": self.protocol}


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    limit = Structure.of(model).max_positions
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    if limit and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} is beyond the model's {limit} positions; use --seq-len {limit} or less")


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, data: str, seq_len: int, *, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    check_seq_len(model, seq_len)
    spec = DataSpec.parse(data, default_split="eval")
    blocks, _ = load_blocks(data, tokenizer, seq_len, default_split="eval", max_blocks=max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total_nll, scored = 0.0, 0
    batches = blocks.split(batch_size)
    for batch in track(batches, len(batches), f"perplexity {spec.source}", enabled=progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        scored += targets.numel()
    model.train(was_training)
    nll = total_nll / scored
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, data=spec.source, split=spec.split, seq_len=seq_len,
        windows=len(blocks), tokens_scored=scored, seconds=time.perf_counter() - start,
    )
