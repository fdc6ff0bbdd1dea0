"""The CPU tensor-memory count covers the first steps only (it slows every step it watches): the peak
over those steps is the peak over the whole run, for every kind of run the loop trains."""

from __future__ import annotations

import pytest
import torch
from loraprune_run import run as loraprune_run
from tiny import tiny_model

from prunetune.training.lora import LoraSettings, add_lora
from prunetune.training.loop import MEMORY_STEPS, TrainSettings, train

STEPS = 7


def _plain_run(lora: bool, checkpointing: bool, memory_steps):
    model = tiny_model("llama", intermediate_size=128)
    if lora:
        torch.manual_seed(0)
        model = add_lora(model, LoraSettings(dropout=0.0))
    else:
        model.requires_grad_(True)
    blocks = torch.randint(0, 96, (32, 24), generator=torch.Generator().manual_seed(1))
    settings = TrainSettings(steps=STEPS, batch_size=2, seq_len=24, lr=1e-3, gradient_checkpointing=checkpointing)
    return train(model, blocks, torch.ones_like(blocks, dtype=torch.bool), settings, progress=False,
                 memory_steps=memory_steps)


@pytest.mark.parametrize("lora,checkpointing", [(False, False), (False, True), (True, False)],
                         ids=["full", "full-checkpointed", "lora"])
def test_the_first_steps_reach_the_whole_runs_peak(lora, checkpointing):
    every = _plain_run(lora, checkpointing, memory_steps=None)
    first = _plain_run(lora, checkpointing, memory_steps=MEMORY_STEPS)
    assert first.memory_counted_steps == MEMORY_STEPS and every.memory_counted_steps is None
    assert first.peak_memory_bytes == every.peak_memory_bytes > 0
    assert [h["loss"] for h in first.history] == [h["loss"] for h in every.history]


@pytest.mark.parametrize("distill", [False, True], ids=["loraprune", "loraprune-distilled"])
def test_loraprune_reaches_its_peak_in_the_first_steps(distill):
    """LoRAPrune scores every step the same way; every 2 of these 12 steps it also moves its masks, whose
    small per-unit scale vectors (a few KB here, 0.2 MB on SmolLM2) are all the later steps add."""
    every = loraprune_run(batch_size=4, distill=distill, memory_steps=None)[-1]
    first = loraprune_run(batch_size=4, distill=distill, memory_steps=MEMORY_STEPS)[-1]
    assert first.peak_memory_bytes == pytest.approx(every.peak_memory_bytes, rel=2e-3)
    assert first.peak_memory_bytes <= every.peak_memory_bytes
