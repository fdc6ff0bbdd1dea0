"""FSDP around the shared training loop: accelerate's FSDP2 (`fully_shard`, one unit per decoder layer).

Under FSDP every process keeps only its shard (a slice of rows) of each parameter, of its gradient and
of the optimizer state; a decoder layer's full weights exist only while that layer runs forward or
backward. What the loop needs around that lives here:

- `enable_on_cpu`: accelerate turns FSDP on only for GPU-like backends, but FSDP2 itself runs on CPU
  processes with gloo. So on a machine without GPUs (the tests, CI), a run launched with an FSDP
  config (`accelerate launch --config_file configs/accelerate/fsdp.yaml`) is switched to the same
  FSDP plugin accelerate builds from that config's environment.
- `meta_twin` / `gather_to_main`: after training, the main process gets a plain model with the full
  weights, gathered tensor by tensor into one CPU copy, for merging, cutting, evaluating and saving;
  the other processes get none. No process ever holds two full copies.
- `save_sharded` / `load_sharded`: checkpoints through torch.distributed.checkpoint, each process
  writing and reading its own shards of the trainable weights and the optimizer state.
- `local_tensor` and `state_bytes`: what a process holds itself, for the memory record.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with an FSDP config


def fsdp_requested() -> bool:
    return os.environ.get(FSDP_ENV, "false").lower() == "true"


def refuse_quant_under_fsdp(quant: str | None) -> None:
    """A one-line error, before any model loads: FSDP shards plain tensors, not a bitsandbytes base."""
    if quant and fsdp_requested():
        from ..errors import UserError

        raise UserError("FSDP shards plain weights; RunOptions.quant (a bitsandbytes base) runs in one process or "
                        "under DDP (configs/accelerate/ddp.yaml)")


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def enable_on_cpu(accelerator) -> None:
    """Switch a multi-process CPU accelerator to FSDP when the launch asked for it (see the module doc)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launch set
    if plugin.fsdp_version != 2:
        from ..errors import UserError

        raise UserError("prunetune runs FSDP version 2 (fully_shard); set fsdp_version: 2 in the accelerate config")
    from accelerate.state import PartialState

    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # what accelerate's helpers read, e.g. after a reset


def leave_to_main(accelerator) -> dict:
    """Under FSDP a process other than the main one is done when training is: it waits, as the main
    process does before and after writing the run directory (two barriers), and returns no record."""
    accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    return {}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "device_mesh")


def row_slice(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's rows of an FSDP parameter (FSDP2 shards every parameter along its first dimension,
    in torch.chunk's pieces: ceil(rows / processes) each, the last ones shorter or empty) and the
    index of its first row."""
    placement = tensor.placements[0]
    if not (placement.is_shard() and placement.dim == 0):
        raise ValueError(f"expected a parameter sharded by rows, got {tensor.placements}")
    mesh = tensor.device_mesh
    rows_each = -(-tensor.shape[0] // mesh.size())
    return tensor.to_local(), mesh.get_local_rank() * rows_each


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Add up each process's partial sums (scores of the rows it holds) into the whole, on every process."""
    torch.distributed.all_reduce(tensor)
    return tensor


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of the parameters, their gradients and the optimizer state."""
    params = list(model.parameters())
    optimizer_state = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]

    def total(tensors):
        return sum(local_tensor(t).numel() * t.element_size() for t in tensors)

    return {"parameters": total(params), "gradients": total([p.grad for p in params if p.grad is not None]),
            "optimizer": total(optimizer_state)}


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters live on the meta device (no memory) and which carries no hooks:
    the frame the gathered weights are loaded into. Buffers (RoPE frequencies) are small and copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():  # masks' and checkpointing's hooks belong to the training model
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            hooks.clear()
    return twin


def gather_to_main(accelerator, model: nn.Module, twin: nn.Module | None) -> nn.Module | None:
    """The trained weights of the FSDP `model` as a plain model on the main process (`twin` is its
    `meta_twin`, made before sharding); None on the others. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    return load_into_twin(twin, full)


def load_into_twin(twin: nn.Module, state: dict) -> nn.Module:
    """Assign a full state dict's tensors to the parameters of a `meta_twin`, tying what the config ties."""
    from ..modeling import unwrap

    twin.load_state_dict(state, assign=True, strict=True)
    base = unwrap(twin)
    if getattr(base.config, "tie_word_embeddings", False) and hasattr(base, "tie_weights"):
        base.tie_weights()  # the state dict holds the tied tensor twice; assigning it untied them
    return twin


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the trainable weights and of the optimizer state to `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
