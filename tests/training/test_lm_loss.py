"""The training loss without full logits equals transformers' loss, value and gradients, and the
tensor-memory measure counts what a training step holds."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, tiny_model, tokens

from prunetune.training import loss as lm_loss
from prunetune.training.tensor_memory import TensorMemory, module_tensors, optimizer_tensors
from prunetune.training.loss import ChunkedLoss
from prunetune.training.lora import LoraSettings, add_lora


def _loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_loss_equals_the_models_own(arch, monkeypatch):
    monkeypatch.setattr(lm_loss, "MIN_CHUNK", 5)  # 5 positions a chunk: several, the last one short
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 96 * 5)
    model = tiny_model(arch).train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = tokens(batch=3, length=12)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, -100)
    chunked = ChunkedLoss(model)
    assert chunked.chunked
    want, want_grads = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss)
    got, got_grads = _loss_and_grads(model, lambda: chunked(ids, labels))
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_through_peft_reaches_the_adapter():
    model = add_lora(tiny_model("qwen2"), LoraSettings(r=4, alpha=8, dropout=0.0))
    ids = tokens()
    want, want_grads = _loss_and_grads(model, lambda: model(input_ids=ids, labels=ids).loss)
    got, got_grads = _loss_and_grads(model, lambda: ChunkedLoss(model)(ids, ids))
    torch.testing.assert_close(got, want)
    assert want_grads and all("lora_" in name for name in got_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


def test_tensor_memory_follows_allocations_and_frees():
    held = torch.zeros(1000)  # 4,000 bytes alive from the start
    with TensorMemory([held, held[10:]]) as memory:  # a view counts once
        assert memory.current == 4000
        big = torch.ones(10_000)  # +40,000
        small = big[:100] * 2  # +400
        del big
        assert memory.current == 4400
    assert memory.peak == 44_400
    del small


def test_tensor_memory_counts_a_training_step():
    """Weights and optimizer state from the start; the step adds gradients and activations."""
    model = tiny_model("llama").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = sum(p.numel() * 4 for p in model.parameters())
    model(input_ids=tokens(), labels=tokens()).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with TensorMemory(module_tensors(model) + optimizer_tensors(optimizer)) as memory:
        assert memory.current >= 3 * weights  # weights and two Adam moments
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        optimizer.step()
    assert memory.peak >= 4 * weights  # ... and the gradients
