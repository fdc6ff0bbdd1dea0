"""The hard-concrete distribution (Louizos et al. 2018) with the constants of Sheared-LLaMA's code.

A unit's gate z is a stretched, clipped binary-concrete sample: it is exactly 0 or exactly 1 with
positive probability and differentiable in log_alpha in between, so an L0 penalty (the probability
that z is non-zero) can be trained by gradient descent. Constants and rules follow
princeton-nlp/LLM-Shearing llmshearing/models/l0_module.py: stretch limits (-0.1, 1.1), temperature
2/3, log_alpha initialised N(5, 0.01) and clamped to [log 1e-2, log 1e2] before every use; the
deterministic gate keeps exactly the target number of units with the largest log_alpha, valued
sigmoid(log_alpha / temperature * 0.8) (the code's "magical number", from Wang et al. 2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn

LIMIT_LEFT, LIMIT_RIGHT = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
EPSILON = 1e-6
MAGICAL_NUMBER = 0.8
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
INIT_MEAN, INIT_STD = 5.0, 1e-2
# log(-l / r): where the stretched sample crosses zero, in logit space.
_ZERO_LOGIT = math.log(-LIMIT_LEFT / LIMIT_RIGHT)


class HardConcrete(nn.Module):
    """Gates over `rows` independent rows of `size` units; the final gate keeps `keep` units per row.

    `groups` splits every row into that many equal blocks that must keep equal numbers of units
    (query heads inside key/value groups); `keep` must then be a multiple of `groups`.
    """

    def __init__(self, rows: int, size: int, keep: int, groups: int = 1):
        super().__init__()
        if size % groups or keep % groups or not 0 < keep <= size:
            raise ValueError(f"cannot keep {keep} of {size} units in {groups} equal groups")
        self.size, self.keep, self.groups = size, keep, groups
        self.log_alpha = nn.Parameter(torch.empty(rows, size).normal_(INIT_MEAN, INIT_STD))

    def constrain(self) -> None:
        """Clamp log_alpha in place (the official `constrain_parameters`), outside autograd."""
        with torch.no_grad():
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def sample(self) -> torch.Tensor:
        """A fresh reparameterised sample z in [0, 1], differentiable in log_alpha."""
        self.constrain()
        u = torch.empty_like(self.log_alpha).uniform_(EPSILON, 1 - EPSILON)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / TEMPERATURE)
        return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)

    def keep_probability(self) -> torch.Tensor:
        """P(z > 0) = 1 - Q(0) per unit, the L0 "expected score"; differentiable."""
        self.constrain()
        closed = torch.sigmoid(_ZERO_LOGIT * TEMPERATURE - self.log_alpha).clamp(EPSILON, 1 - EPSILON)
        return 1 - closed

    def keep_mask(self) -> torch.Tensor:
        """Boolean final mask: the `keep` units of each row with the largest log_alpha, equal per group."""
        self.constrain()
        rows = self.log_alpha.shape[0]
        blocks = self.log_alpha.detach().reshape(rows, self.groups, self.size // self.groups)
        top = blocks.topk(self.keep // self.groups, dim=-1).indices
        mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
        return mask.reshape(rows, self.size)

    def deterministic(self) -> torch.Tensor:
        """The eval/final gate: soft kept values on `keep_mask()`, zero elsewhere (no gradient)."""
        keep = self.keep_mask()  # clamps log_alpha first
        with torch.no_grad():
            return torch.sigmoid(self.log_alpha / TEMPERATURE * MAGICAL_NUMBER) * keep

    def extra_repr(self) -> str:
        rows, size = self.log_alpha.shape
        return f"rows={rows}, size={size}, keep={self.keep}, groups={self.groups}"
