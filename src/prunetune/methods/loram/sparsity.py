"""Unstructured and N:M (2:4) sparsity: weights keep their shapes, pruned entries are zero.

Used by LoRAM's `--method unst|semi`. A sparse mask is a bool keep-mask (True = keep) of a
projection's weight shape, keyed by (layer index, projection name) over the seven projections
q, k, v, o, gate, up, down. Every row (output feature) is pruned on its own:

  - unst: `round(ratio x in_features)` weights of each row are zeroed;
  - semi (N:M, 2:4 by default): in every group of M consecutive input weights of a row the N with
    the highest scores are kept (the layout sparse tensor cores accelerate), so the ratio is 1 - N/M.

A pruned model is saved as an ordinary checkpoint (`save_pretrained`): the zeros are in the weights,
so the masks need no file of their own and `KeepZeros.from_zeros` rebuilds them after loading. The
files are as large as the dense model's (safetensors stores zeros like any value); the parameter
reduction ratio counts the nonzeros. Merging a LoRA into a sparse base fills the zeros in.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import SettingError, UserError
from ...training.sharding import is_sharded, local_tensor, row_slice
from ...training.loop import TrainHooks
from ...structure.units import PROJECTIONS, base_linear, count_parameters, decoder_layers, dense_weight, projection

PATTERNS = ("unst", "semi")
SparseMasks = dict[tuple[int, str], torch.Tensor]


def check_pattern(pattern: str, ratio: float, n_m: tuple[int, int] = (2, 4)) -> None:
    """UserError unless `pattern` with `ratio` (and N:M for semi) is something we can do."""
    # pattern and ratio are LoramPruneSettings.method and .ratio (`loram prune --method unst|semi`)
    if pattern not in PATTERNS:
        raise SettingError("LoramPruneSettings.method", f"unknown sparsity pattern '{pattern}'; use unst "
                           "(unstructured) or semi (N:M, 2:4)")
    if not 0 < ratio < 1:
        raise SettingError("LoramPruneSettings.ratio", "LoramPruneSettings.ratio is the fraction of weights zeroed "
                           f"and must be in (0, 1), got {ratio}")
    if pattern == "semi":
        n, m = n_m
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise UserError(f"N:M sparsity keeps N of every M weights with 0 < N < M, got {n}:{m}")
        if abs(ratio - (1 - n / m)) > 1e-9:
            raise SettingError("LoramPruneSettings.ratio", f"semi ({n}:{m}) sparsity zeroes a fixed {1 - n / m:g} "
                               f"of the weights; set LoramPruneSettings.ratio {1 - n / m:g} or use "
                               f"LoramPruneSettings.method unst for ratio {ratio}")


def require_dense(model: nn.Module) -> None:
    from ...models import is_quantized

    if is_quantized(model):
        raise UserError("unstructured and 2:4 pruning write zeros into the weights and need a 16/32-bit model, "
                        "not an 8-bit or NF4 one; load it without RunOptions.quant (quantize the pruned model "
                        "afterwards)")


def keep_mask(scores: torch.Tensor, pattern: str, ratio: float = 0.5, n_m: tuple[int, int] = (2, 4)) -> torch.Tensor:
    """Bool keep-mask of `scores`' shape [out, in]: the highest scores of each row survive (ties: any)."""
    rows, cols = scores.shape
    if pattern == "unst":
        pruned = scores.topk(round(ratio * cols), dim=1, largest=False).indices
        return torch.ones_like(scores, dtype=torch.bool).scatter_(1, pruned, False)
    n, m = n_m
    if cols % m:
        raise UserError(f"{n}:{m} sparsity needs input widths divisible by {m}; a projection has {cols}")
    groups = scores.reshape(rows, cols // m, m)
    kept = groups.topk(n, dim=2).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, kept, True).reshape(rows, cols)


def _weight(model: nn.Module, key: tuple[int, str]) -> torch.Tensor:
    layer, name = key
    return base_linear(projection(decoder_layers(model)[layer], name)).weight


@torch.no_grad()
def apply_sparsity(model: nn.Module, masks: SparseMasks) -> None:
    """Zero the pruned entries (False in the keep-masks) of the projections, in place, in any float dtype."""
    require_dense(model)
    for key, keep in masks.items():
        weight = _weight(model, key)
        if keep.shape != weight.shape:
            raise ValueError(f"mask of {key} has shape {tuple(keep.shape)}, the weight {tuple(weight.shape)}")
        weight.masked_fill_(~keep.to(weight.device), 0)


class KeepZeros(TrainHooks):
    """Keeps pruned weights at zero through full-parameter training (LoRAM's alignment step).

    Before each optimizer step the gradients of pruned entries are zeroed (so clipping and AdamW's
    moments see only the live weights: projected gradient descent on the sparse pattern); after it
    the pruned entries are set to zero again, whatever the optimizer did (weight decay, fp rounding).

    Memory: one bool (1 byte) per weight of every projection that has pruned entries, kept on the
    weight's device, i.e. half the size of bf16 weights. Full-parameter AdamW already holds a
    gradient and two fp32 moments per weight, so the masks add a few percent. Nothing is saved in
    checkpoints: the zeros are in the weights, and `from_zeros` rebuilds the masks after a resume.
    """

    def __init__(self, model: nn.Module, masks: SparseMasks):
        require_dense(model)
        # (projection, True = pruned): the weight is read from its module at every step, because FSDP
        # replaces each parameter with its shard after these hooks are made
        self.pruned: list[tuple[nn.Module, torch.Tensor]] = []
        for (layer, name), keep in masks.items():
            linear = base_linear(projection(decoder_layers(model)[layer], name))
            if not bool(keep.all()):
                self.pruned.append((linear, ~keep.to(device=linear.weight.device, dtype=torch.bool)))

    @classmethod
    def from_zeros(cls, model: nn.Module) -> "KeepZeros":
        """Masks from the zeros already in the seven projections (of a model pruned and saved earlier)."""
        return cls(model, {(i, name): dense_weight(projection(layer, name)) != 0
                           for i, layer in enumerate(decoder_layers(model)) for name in PROJECTIONS})

    def _local(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each pruned weight as this process holds it, with its mask's matching rows. Under FSDP that is
        the process's shard; the mask is cut down to those rows once, so no process keeps a whole mask."""
        pairs = []
        for i, (linear, pruned) in enumerate(self.pruned):
            weight = linear.weight
            if is_sharded(weight) and pruned.shape != weight.to_local().shape:
                local, first = row_slice(weight)
                pruned = pruned[first: first + local.shape[0]].clone()  # a copy: the whole mask is freed
                self.pruned[i] = (linear, pruned)
            pairs.append((weight, pruned))
        return pairs

    @torch.no_grad()
    def before_optimizer_step(self, step: int) -> None:
        for weight, pruned in self._local():
            if weight.grad is not None:
                local_tensor(weight.grad).masked_fill_(pruned, 0)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for weight, pruned in self._local():
            local_tensor(weight).masked_fill_(pruned, 0)


@torch.no_grad()
def sparsity_summary(model: nn.Module) -> dict:
    """Zeros and nonzeros of each projection type over all layers, of all seven together ("overall"),
    and the model's parameter count with and without the zeros ("parameters": total, nonzero)."""
    counts = {name: [0, 0] for name in PROJECTIONS}  # zeros, total
    for layer in decoder_layers(model):
        for name in PROJECTIONS:
            weight = dense_weight(projection(layer, name))
            counts[name][0] += int((weight == 0).sum())
            counts[name][1] += weight.numel()

    def entry(zeros: int, total: int) -> dict:
        return {"zeros": zeros, "nonzeros": total - zeros, "total": total, "sparsity": zeros / total if total else 0.0}

    zeros = sum(z for z, _ in counts.values())
    params = count_parameters(model)["total"]
    return {
        "projections": {name: entry(*counts[name]) for name in PROJECTIONS},
        "overall": entry(zeros, sum(t for _, t in counts.values())),
        "parameters": {"total": params, "nonzero": params - zeros},
    }


def reduction_ratio(original_params: int, pruned_params: int, bits: int = 16) -> float:
    """LoRAM's parameter reduction ratio: original ÷ (pruned × bits / 16). For unst/semi `pruned_params`
    is the nonzero count of the pruned projections plus every other parameter (`sparsity_summary`)."""
    if original_params <= 0 or pruned_params <= 0 or bits <= 0:
        raise ValueError("parameter counts and bits must be positive")
    return original_params / (pruned_params * bits / 16)
