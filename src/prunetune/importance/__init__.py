"""Importance criteria: each scores every head and MLP channel of a model.

A criterion returns one `LayerScores` per decoder layer; how heads combine into the pruned unit
(a key/value group, or a single query head) is decided by `LayerScores.head_unit_scores`.

Every criterion is called the same way: `criterion(model, batches=None, *, seed=0)`, where `batches`
is a list of input-id tensors [batch, length] of calibration data (taylor, wanda-sp and lora-guided need it;
magnitude and random ignore it) and `seed` seeds the random criterion.
"""

from __future__ import annotations

from .lora_guided import lora_guided_one_shot_scores
from .magnitude import magnitude_scores
from .random_criterion import random_scores
from ..structure.scores import LayerScores
from .taylor import taylor_scores
from .wanda import wanda_sp_scores

CRITERIA = {
    "magnitude": magnitude_scores,
    "taylor": taylor_scores,
    "wanda-sp": wanda_sp_scores,
    "random": random_scores,
    "lora-guided": lora_guided_one_shot_scores,
}

__all__ = ["CRITERIA", "LayerScores", "magnitude_scores", "random_scores", "taylor_scores", "wanda_sp_scores"]
