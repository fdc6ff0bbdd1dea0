"""The next-token loss of a causal LM without its full logits tensor.

`model(input_ids, labels=...)` builds logits for every position over the whole vocabulary, and the
cross-entropy keeps its log-softmax and gradient the same size: for SmolLM2 (vocabulary 49,152) at
batch 4 x 256 that is three 200 MB fp32 tensors, more than the memory of the rest of a LoRA step on
the pruned model LoRAM trains. Here the model runs through its own forward (so DDP, PEFT and mask
hooks see a normal call) with `logits_to_keep` set to no position; a hook keeps the decoder's last
hidden states, and the loss is summed over chunks of positions, each chunk's logits built under
activation checkpointing, so one chunk's logits exist at a time, in the forward and the backward.
The value is the same mean over labelled positions that transformers' causal-LM loss computes.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..modeling import unwrap

# Logits per chunk: 16 MiB in fp32, 85 positions of SmolLM2's 49k vocabulary (measured there on a LoRA
# step at batch 4 x 256: peak tensor memory 1187 MiB with full logits, 807 at 2**24, 689 at 2**22, at
# the same speed); at least MIN_CHUNK positions, so a GPU with a large vocabulary keeps GEMMs of a size
# it runs well.
CHUNK_ELEMENTS = 2 ** 22
MIN_CHUNK = 128


class FinalHidden:
    """`hidden(ids)`: the decoder's last hidden states from `model`'s own forward, with no logits
    kept; `head` is the output projection that turns them into logits. `available` is False where
    the model has no `logits_to_keep` or no separate decoder."""

    def __init__(self, model: nn.Module):
        self.model = model
        hf = unwrap(model)
        forward = inspect.signature(type(hf).forward).parameters
        self.decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
        self.head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        self.available = "logits_to_keep" in forward and self.decoder is not None and self.head is not None
        self._hidden: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Run `model` (default: the one given at construction, e.g. its DDP wrapper) on `ids`."""
        handle = self.decoder.register_forward_hook(self._keep_hidden)
        try:
            no_position = torch.zeros(0, dtype=torch.long, device=ids.device)
            output = (model or self.model)(input_ids=ids, use_cache=False, logits_to_keep=no_position)
        finally:
            handle.remove()
        hidden, self._hidden = self._hidden, None
        logits = getattr(output, "logits", None)
        if logits is not None and logits.requires_grad:
            # Tie the loss to the model's own (empty) output, adding exactly zero. FSDP2 starts a root
            # module's backward from hooks on its outputs; a loss built from the hidden states alone
            # never fires them, and its backward then reads freed parameter storage (a segfault on 2
            # CPU processes). DDP and one process are unaffected.
            hidden = hidden + logits.sum()
        return hidden

    def _keep_hidden(self, module, args, output) -> None:
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class ChunkedLoss:
    """`loss(ids, labels)` for `model`; falls back to the model's own loss where the model has no
    `logits_to_keep` or no separate decoder (then the full logits are built as before).
    `terms` holds the last call's loss terms, detached, for the training log."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.final_hidden = FinalHidden(model)
        self.chunked = self.final_hidden.available
        self.head = self.final_hidden.head
        self.terms: dict[str, torch.Tensor] = {}

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.chunked:
            loss = self.model(input_ids=ids, labels=labels, use_cache=False).loss
        else:
            loss = chunked_next_token_loss(self.final_hidden(ids), labels, self.head)
        self.terms = {"lm": loss.detach()}
        return loss


def chunked_next_token_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from hidden[:, t] (-100: no loss), `head`
    applied a chunk of positions at a time and recomputed in the backward."""
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    counted = (targets != -100).sum()
    chunk = max(MIN_CHUNK, CHUNK_ELEMENTS // head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_loss_sum, states[part], targets[part], head, use_reentrant=False)
    # transformers divides by the count the same way (a batch with no labels gives nan there too)
    return total / counted


def _loss_sum(states: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, ignore_index=-100, reduction="sum")
