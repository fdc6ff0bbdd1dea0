"""Wanda (Sun et al. 2023, arXiv 2306.11695) and magnitude scores for unstructured and N:M sparsity.

Wanda scores a weight by |W_ij| · ||X_j||₂, X_j the j-th input feature of its projection over every
calibration token, and compares weights within each output row. Magnitude scores by |W_ij| alone,
in the same per-row groups (no data).

By default Wanda runs sequentially, as its reference code does: layer i's input norms are measured
on the outputs of the already pruned layers before it; each layer then runs once more, pruned, to
produce the next layer's inputs. This holds one hidden-state tensor per calibration batch
(samples x tokens x hidden) in memory. `sequential=False` measures every layer in one pass over the
dense model's activations instead, a simplification that is cheaper and pays no attention to how
pruning earlier layers shifts later inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...errors import UserError
from .sparsity import SparseMasks, apply_sparsity, check_pattern, keep_mask, require_dense
from ...structure.units import PROJECTIONS, base_linear, decoder_layers, linear_shape, projection
from ...modeling import eval_mode
from ...importance.calibration import input_device, require_batches
from ...importance.wanda import input_norms

SPARSE_CRITERIA = ("wanda", "magnitude")


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ||X_j||₂ in float32; `norms` holds one L2 norm per input feature."""
    return weight.detach().float().abs() * norms.to(weight.device, torch.float32)[None, :]


def sparsify(model: nn.Module, pattern: str = "unst", ratio: float = 0.5, *, criterion: str = "wanda",
             batches: list[torch.Tensor] | None = None, layers: Sequence[int] | None = None,
             n_m: tuple[int, int] = (2, 4), sequential: bool = True) -> SparseMasks:
    """Prune the seven projections of `layers` (default: every layer, as Wanda does) in place and
    return the keep-masks. `batches`: calibration input ids [batch, length], needed by wanda."""
    check_pattern(pattern, ratio, n_m)
    if criterion not in SPARSE_CRITERIA:
        raise UserError(f"unknown criterion '{criterion}' for unst/semi pruning; use {' or '.join(SPARSE_CRITERIA)}")
    require_dense(model)
    blocks = decoder_layers(model)
    indices = sorted(set(range(len(blocks)) if layers is None else layers))
    if not indices or not all(0 <= i < len(blocks) for i in indices):
        raise UserError(f"layers to prune must be among 0..{len(blocks) - 1}, got {list(layers or [])}")
    widths = {linear_shape(projection(blocks[i], name))[1] for i in indices for name in PROJECTIONS}
    if pattern == "semi" and any(width % n_m[1] for width in widths):  # fail before any weight changes
        raise UserError(f"{n_m[0]}:{n_m[1]} sparsity needs input widths divisible by {n_m[1]}; "
                        f"this model has {', '.join(map(str, sorted(widths)))}")

    def prune_layer(i: int, norms: dict[str, torch.Tensor] | None) -> None:
        layer_masks = {}
        for name in PROJECTIONS:
            weight = base_linear(projection(blocks[i], name)).weight
            scores = weight.detach().float().abs() if norms is None else wanda_scores(weight, norms[name])
            layer_masks[(i, name)] = keep_mask(scores, pattern, ratio, n_m)
        apply_sparsity(model, layer_masks)
        masks.update(layer_masks)

    masks: SparseMasks = {}
    with torch.no_grad():
        if criterion == "magnitude":
            for i in indices:
                prune_layer(i, None)
            return masks
        batches = require_batches(batches, "wanda")
        if not sequential:
            dense_norms = input_norms(model, batches)
            for i in indices:
                prune_layer(i, dense_norms[i])
            return masks
        with eval_mode(model):
            hidden, calls = _layer_inputs(model, batches, indices[0], indices[-1])
            for i in range(indices[0], indices[-1] + 1):
                if i in indices:
                    prune_layer(i, _layer_norms(blocks[i], hidden, calls[i]))
                if i < indices[-1]:
                    hidden = [_output(blocks[i](h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls[i])]
    return masks


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, batches: list[torch.Tensor], first: int, last: int):
    """Per batch, the hidden states entering layer `first`, and for layers first..last the other
    arguments each was called with (masks and rotary embeddings may differ between layers)."""
    blocks = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    calls: dict[int, list] = {i: [] for i in range(first, last + 1)}

    def record(i: int):
        def hook(_module, args, kwargs):
            if i == first:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            calls[i].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if i == last:
                raise _Stop  # nothing after the last pruned layer is needed
        return hook

    handles = [blocks[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(first, last + 1)]
    device = input_device(model)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


def _layer_norms(layer: nn.Module, hidden: list[torch.Tensor], calls: list) -> dict[str, torch.Tensor]:
    """Run one decoder layer on every batch and return each projection's input-feature L2 norms."""
    sums = {name: None for name in PROJECTIONS}

    def accumulate(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().pow(2).sum(dim=0)
            sums[name] = x if sums[name] is None else sums[name] + x
        return hook

    handles = [projection(layer, name).register_forward_pre_hook(accumulate(name)) for name in PROJECTIONS]
    try:
        for h, (args, kwargs) in zip(hidden, calls):
            layer(h, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
