"""The data-driven one-shot criteria under FSDP: every process scores the rows it holds.

One process computes Taylor's |W ⊙ ∂L/∂W| with a gradient for every projection weight, a second
model's worth of memory. Under FSDP the model is sharded first (FSDP2, one unit per decoder layer),
so each process keeps only its rows of every weight and of its gradient:

- the calibration batches are dealt out, batch i to process i mod N, every process running the
  same number of forward and backward passes (a process short of a batch runs one with weight 0,
  because FSDP's gathers are collective);
- Taylor: the gradients are summed, not averaged, across processes, so each process holds its rows
  of the one-process gradient sum; Wanda-sp: each process adds up its own tokens' input norms and
  the sums are added across processes;
- each process turns the rows it holds into unit sums: whole units for row-units (q, k, v heads,
  gate and up channels), partial column sums for o and down (`local_unit_sums`); adding them
  across processes gives the one-process scores, on every process. No process gathers a weight.

Afterwards every process gets the plain model back (`unshard_everywhere`) for the cut and the
recovery, which shards it again under the training loop.
"""

from __future__ import annotations

import torch
from torch import nn

from ..training.sharding import load_into_twin, local_tensor, meta_twin, row_slice, sum_across_processes
from ..structure.units import PROJECTIONS, base_linear, decoder_layers, projection, unit_sums
from ..modeling import eval_mode
from .calibration import input_device, require_batches
from ..structure.scores import LayerScores
from .taylor import quantized_refusal
from .wanda import squared_input_sums

COLUMN_UNITS = ("o_proj", "down_proj")  # projections whose units are columns


def local_unit_sums(name: str, per_weight_rows: torch.Tensor, first: int, shape: tuple[int, int],
                    head_dim: int) -> torch.Tensor:
    """This process's share of one projection's unit sums, from the per-weight scores of the rows it
    holds (rows first.. of a weight of `shape`): the sums over all processes are the whole."""
    rows, columns = shape
    if name in COLUMN_UNITS:
        if per_weight_rows.shape[0] == 0:  # a process that holds no rows of this weight
            return torch.zeros(columns // head_dim if name == "o_proj" else columns)
        return unit_sums(name, per_weight_rows, head_dim).cpu()
    row_sums = torch.zeros(rows)
    row_sums[first:first + per_weight_rows.shape[0]] = per_weight_rows.float().sum(dim=1).cpu()
    return unit_sums(name, row_sums, head_dim)


def _shard(model: nn.Module) -> nn.Module:
    """FSDP2 over `model` as accelerate's config does it: one unit per decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def unshard_everywhere(model: nn.Module, twin: nn.Module) -> nn.Module:
    """The sharded `model`'s weights, whole, in the plain `twin` (its `meta_twin`) on every process.
    Each process holds its shards and the whole model while they are loaded, never two whole copies."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return load_into_twin(twin, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))


def _run_dealt_batches(model: nn.Module, batches: list[torch.Tensor], backward: bool, weighting=None) -> None:
    """Batch i goes to process i mod N; every process runs as many passes as the busiest one."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mine = batches[rank::world]
    passes = -(-len(batches) // world)
    device = input_device(model)
    with eval_mode(model), torch.set_grad_enabled(backward):
        for i in range(passes):
            real = i < len(mine)
            batch = (mine[i] if real else batches[0]).to(device)
            if weighting is not None:
                weighting(real)
            out = model(input_ids=batch, labels=batch if backward else None, use_cache=False)
            if backward:
                (out.loss * (1.0 if real else 0.0)).backward()


def sharded_taylor_scores(model: nn.Module, batches: list[torch.Tensor] | None) -> tuple[list[LayerScores], nn.Module]:
    """Taylor's scores with the model sharded; returns them and the plain model, on every process."""
    batches = require_batches(batches, "taylor")
    quantized_refusal(model, "the taylor criterion")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {id(base_linear(projection(layer, n)).weight) for layer in decoder_layers(model) for n in PROJECTIONS}
    for p in model.parameters():
        p.requires_grad_(id(p) in weights)
    twin = meta_twin(model)
    _shard(model)
    for module in model.modules():  # the one-process criterion sums the batches' gradients
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-scaled one
    _run_dealt_batches(model, batches, backward=True)
    scores = []
    with torch.no_grad():
        for layer in decoder_layers(model):
            head_dim = layer.self_attn.head_dim
            per_projection = {}
            for name in PROJECTIONS:
                weight = base_linear(projection(layer, name)).weight
                rows, first = row_slice(weight)
                grad = local_tensor(weight.grad) if weight.grad is not None else torch.zeros_like(rows)
                per_weight = (rows.float() * grad.float()).abs()
                per_projection[name] = local_unit_sums(name, per_weight, first, tuple(weight.shape), head_dim)
            scores.append(LayerScores.from_projections(_summed(per_projection, model)))
        for p in model.parameters():
            p.grad = None
    plain = unshard_everywhere(model, twin)
    for name, p in plain.named_parameters():
        p.requires_grad_(flags.get(name, False))
    return scores, plain


def sharded_wanda_sp_scores(model: nn.Module,
                            batches: list[torch.Tensor] | None) -> tuple[list[LayerScores], nn.Module]:
    """Wanda-sp's scores with the model sharded; returns them and the plain model, on every process."""
    batches = require_batches(batches, "wanda-sp")
    twin = meta_twin(model)
    _shard(model)
    counting = {"on": True}  # off for a process's weight-0 pass
    sums, handles = squared_input_sums(model, lambda: counting["on"])
    try:
        _run_dealt_batches(model, batches, backward=False, weighting=lambda real: counting.update(on=real))
    finally:
        for handle in handles:
            handle.remove()
    scores = []
    with torch.no_grad():
        for layer, layer_sums in zip(decoder_layers(model), sums):
            head_dim = layer.self_attn.head_dim
            per_projection = {}
            for name in PROJECTIONS:
                norms = sum_across_processes(layer_sums[name]).sqrt()
                weight = base_linear(projection(layer, name)).weight
                rows, first = row_slice(weight)
                per_weight = rows.float().abs() * norms.to(rows.device)[None, :]
                per_projection[name] = local_unit_sums(name, per_weight, first, tuple(weight.shape), head_dim)
            scores.append(LayerScores.from_projections(_summed(per_projection, model)))
    return scores, unshard_everywhere(model, twin)


def _summed(per_projection: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Every process's partial unit sums added up, the same on every process."""
    device = input_device(model)
    return {name: sum_across_processes(part.to(device)).cpu() for name, part in per_projection.items()}


SHARDED_CRITERIA = {"taylor": sharded_taylor_scores, "wanda-sp": sharded_wanda_sp_scores}
