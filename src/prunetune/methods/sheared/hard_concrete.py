"""The hard-concrete distribution (Louizos et al. 2018) with the constants of Sheared-LLaMA's code.

A unit's gate z is a stretched, clipped binary-concrete sample: it is exactly 0 or exactly 1 with
positive probability and differentiable in log_alpha in between, so an L0 penalty (the probability
that z is non-zero) can be trained by gradient descent. Constants and rules follow
princeton-nlp/LLM-Shearing llmshearing/models/l0_module.py: stretch limits (-0.1, 1.1), temperature
2/3, log_alpha initialised N(5, 0.01) and clamped to [log 1e-2, log 1e2] before every use; the
deterministic gate keeps exactly the target number of units with the largest log_alpha, valued
sigmoid(log_alpha / temperature * 0.8) (the code's "magical number", from Wang et al. 2020).

Reproducibility: the initial log_alpha and every sample's noise come from the `generator` the gates
are given (a CPU `torch.Generator`; the noise is drawn on the CPU and moved to log_alpha's device, so
a seed gives the same noise on every device and every process), never from torch's global generator,
which model loading, dropout and evaluation also draw from.

Importance start (prunetune's, not the official code's): `init_from(priority)` replaces the tied
N(5, 0.01) start with log_alpha ordered by an importance score, from LOG_ALPHA_MAX for a row's most
important unit down by INIT_SPREAD for its least important, so a short shear starts from a
considered choice instead of a tie. Ties in the final selection are broken by the same `priority`
(higher kept first) and then by index (lower kept first): many units sit exactly on a clamp at the
end of a short shear, so the rule matters. Without a priority the rule is the index alone.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

LIMIT_LEFT, LIMIT_RIGHT = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
EPSILON = 1e-6
MAGICAL_NUMBER = 0.8
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
INIT_MEAN, INIT_STD = 5.0, 1e-2
# The importance start's range: log_alpha from LOG_ALPHA_MAX (P(z > 0) 0.998) for the most important
# unit of a row down to LOG_ALPHA_MAX - INIT_SPREAD (0.95) for the least, linear in rank; every unit
# is still kept at the start, as the official start keeps them (the target sparsity warms up from 0).
INIT_SPREAD = 3.0
# At the target (no warm-up): kept units start in [LOG_ALPHA_MAX - 1, LOG_ALPHA_MAX] (P(z > 0) > 0.99),
# the others in [LOG_ALPHA_MIN, LOG_ALPHA_MIN + 1] (P(z > 0) < 0.12).
INIT_SPREAD_AT_TARGET = 1.0
# log(-l / r): where the stretched sample crosses zero, in logit space.
_ZERO_LOGIT = math.log(-LIMIT_LEFT / LIMIT_RIGHT)


class HardConcrete(nn.Module):
    """Gates over `rows` independent rows of `size` units; the final gate keeps `keep` units per row,
    one count for every row or one per row (a per-layer target).

    `groups` splits every row into that many equal blocks that must keep equal numbers of units
    (query heads inside key/value groups); `keep` must then be a multiple of `groups`. A row that
    keeps all its units is not gated: its gates are exactly 1, in training and at the end.
    """

    def __init__(self, rows: int, size: int, keep: int | Sequence[int], groups: int = 1,
                 generator: torch.Generator | None = None):
        super().__init__()
        keeps = [keep] * rows if isinstance(keep, int) else list(keep)
        if len(keeps) != rows:
            raise ValueError(f"{len(keeps)} kept counts for {rows} rows")
        for count in keeps:
            if size % groups or count % groups or not 0 < count <= size:
                raise ValueError(f"cannot keep {count} of {size} units in {groups} equal groups")
        self.size, self.groups = size, groups
        self.keep = torch.tensor(keeps)  # [rows], on the CPU
        # [rows]: rows the target leaves whole; a buffer, so it moves with the gates and a forward
        # pass copies nothing to the device; the flag skips the masking where no row is whole
        self.register_buffer("full", self.keep == size, persistent=False)
        self._has_whole_rows = bool(self.full.any())
        # Initial values and sample noise; None: torch's global generator (not reproducible by itself).
        self.generator = generator
        self.log_alpha = nn.Parameter(torch.empty(rows, size).normal_(INIT_MEAN, INIT_STD, generator=generator))
        # Tie-break order of the final selection (higher first); recomputed by a run, not checkpointed.
        self.register_buffer("priority", torch.zeros(rows, size), persistent=False)

    @torch.no_grad()
    def init_from(self, priority: torch.Tensor, at_target: bool = False) -> None:
        """Start log_alpha ordered by `priority` ([rows, size], higher = more important) and break
        final ties by it. Ranks, not raw values, set the start, so any criterion's scale works.

        Every unit kept (`at_target` False): log_alpha from LOG_ALPHA_MAX down by INIT_SPREAD, for a
        target that warms up from no sparsity. At the target: the `keep` best units of each row (and
        group) within INIT_SPREAD_AT_TARGET of LOG_ALPHA_MAX, the others within it of LOG_ALPHA_MIN,
        so the masks meet the target from the first step (what a target without warm-up asks for)."""
        priority = priority.detach().float().reshape(self.log_alpha.shape).cpu()
        size = priority.shape[-1]
        # rank 0 = least important; equal scores take the index order (stable), lower index higher
        order = priority.argsort(dim=-1, stable=True)
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(size).expand_as(order))
        ranks = ranks.float() / max(1, size - 1)
        self.priority.copy_(priority.to(self.priority.device))
        if at_target:
            self.log_alpha.copy_(ranks.to(self.log_alpha.device))  # the selection by priority alone
            kept = self.keep_mask().cpu()
            start = torch.where(kept, LOG_ALPHA_MAX - INIT_SPREAD_AT_TARGET * (1.0 - ranks),
                                LOG_ALPHA_MIN + INIT_SPREAD_AT_TARGET * ranks)
        else:
            start = LOG_ALPHA_MAX - INIT_SPREAD * (1.0 - ranks)
        self.log_alpha.copy_(start.to(self.log_alpha.device))

    def constrain(self) -> None:
        """Clamp log_alpha in place (the official `constrain_parameters`), outside autograd."""
        with torch.no_grad():
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def sample(self) -> torch.Tensor:
        """A fresh reparameterised sample z in [0, 1], differentiable in log_alpha."""
        self.constrain()
        u = torch.empty(self.log_alpha.shape).uniform_(EPSILON, 1 - EPSILON, generator=self.generator)
        u = u.to(self.log_alpha.device)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / TEMPERATURE)
        return self._whole_rows_open((s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0))

    def keep_probability(self) -> torch.Tensor:
        """P(z > 0) = 1 - Q(0) per unit, the L0 "expected score"; differentiable."""
        self.constrain()
        closed = torch.sigmoid(_ZERO_LOGIT * TEMPERATURE - self.log_alpha).clamp(EPSILON, 1 - EPSILON)
        return self._whole_rows_open(1 - closed)

    def _whole_rows_open(self, gates: torch.Tensor) -> torch.Tensor:
        """`gates` with the rows the target leaves whole set to exactly 1 (no noise, no gradient)."""
        if not self._has_whole_rows:
            return gates
        return torch.where(self.full.reshape(-1, 1), torch.ones_like(gates), gates)

    def keep_mask(self) -> torch.Tensor:
        """Boolean final mask: the `keep` units of each row with the largest log_alpha, equal per group;
        among equal log_alpha the higher priority, then the lower index, is kept (stable descending
        sorts, unlike topk, whose order among ties is unspecified)."""
        self.constrain()
        rows = self.log_alpha.shape[0]
        shape = (rows, self.groups, self.size // self.groups)
        blocks = self.log_alpha.detach().reshape(shape)
        by_priority = self.priority.reshape(shape).to(blocks.device).argsort(dim=-1, descending=True, stable=True)
        order = blocks.gather(-1, by_priority).argsort(dim=-1, descending=True, stable=True)
        ranked = by_priority.gather(-1, order)  # each block's units, best first
        per_block = (self.keep // self.groups).to(blocks.device).reshape(rows, 1, 1)
        chosen = torch.arange(shape[-1], device=blocks.device).expand(shape) < per_block
        mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, ranked, chosen)
        return mask.reshape(rows, self.size)

    def deterministic(self) -> torch.Tensor:
        """The eval/final gate: soft kept values on `keep_mask()`, zero elsewhere (no gradient)."""
        keep = self.keep_mask()  # clamps log_alpha first
        with torch.no_grad():
            return self._whole_rows_open(torch.sigmoid(self.log_alpha / TEMPERATURE * MAGICAL_NUMBER) * keep)

    def extra_repr(self) -> str:
        rows, size = self.log_alpha.shape
        keep = self.keep.tolist()
        return f"rows={rows}, size={size}, keep={keep[0] if len(set(keep)) == 1 else keep}, groups={self.groups}"
