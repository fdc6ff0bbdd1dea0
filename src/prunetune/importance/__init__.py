"""Importance criteria: each scores every head and MLP channel of a model.

A criterion returns one `LayerScores` per decoder layer; how heads combine into the pruned unit
(a key/value group, or a single query head) is decided by `LayerScores.head_unit_scores`.
"""

from __future__ import annotations

from .magnitude import magnitude_scores
from .scores import LayerScores

CRITERIA = {"magnitude": magnitude_scores}

__all__ = ["CRITERIA", "LayerScores", "magnitude_scores"]
