"""Where Sheared-LLaMA's mask logits start: a tie (the paper) or an order by importance (prunetune).

The official code starts every log α at the same value, above the clamp, so every unit of a kind is
tied until training separates them; after a short shear most still are, and the tie rule alone picks
what is cut. An importance start ranks each gate set by a score measured once on calibration
sequences drawn evenly from the training domains:

- heads (key/value groups or query heads) and MLP channels: the chosen criterion (taylor,
  wanda-sp, magnitude, lora-guided), per layer, exactly as the one-shot methods score them;
- whole layers: block influence, 1 − cos(input, output) (importance/layers.py);
- residual channels: Wanda-style ‖W[:, c]‖·‖X_c‖ over every projection that reads them.

The scores also break the final selection's ties (hard_concrete.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ...importance import CRITERIA
from ...importance.layers import block_influence, hidden_channel_scores
from ...importance.calibration import input_device
from .l0_masks import ShearMasks

MASK_INITS = ("taylor", "wanda-sp", "magnitude", "lora-guided", "uniform")


def calibration_batches(blocks: torch.Tensor, samples: int, batch_size: int) -> list[torch.Tensor]:
    """`samples` training blocks spread evenly over all of them (every domain is represented: the
    domains' blocks sit one after another), split into batches."""
    picked = torch.linspace(0, len(blocks) - 1, min(samples, len(blocks))).round().long().unique()
    return list(blocks[picked].split(batch_size))


def mask_priorities(model: nn.Module, masks: ShearMasks, criterion: str, blocks: torch.Tensor, samples: int,
                    batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Importance of every gated unit, as [rows, units] per mask type (higher = more important)."""
    kinds = masks.distributions.keys()
    batches = [b.to(input_device(model)) for b in calibration_batches(blocks, samples, batch_size)]
    priorities = {}
    if "head" in kinds or "intermediate" in kinds:
        scores = CRITERIA[criterion](model, batches, seed=seed)
        if "head" in kinds:
            priorities["head"] = torch.stack([s.head_unit_scores(masks.target.head_unit) for s in scores])
        if "intermediate" in kinds:
            priorities["intermediate"] = torch.stack([s.channels for s in scores])
    if "layer" in kinds:
        priorities["layer"] = block_influence(model, batches).reshape(1, -1)
    if "hidden" in kinds:
        priorities["hidden"] = hidden_channel_scores(model, batches).reshape(1, -1)
    return priorities
