"""Peak live tensor memory on the CPU: what `torch.cuda.max_memory_allocated` counts on a GPU.

On the CPU the only memory figure the OS gives is the resident set, and for a small model it mostly
measures the runtime (the torch and transformers libraries, the allocator's free lists) rather than
the training: two LoRA runs whose tensors differ by 40% differ by a few percent in RSS. This counts
tensor storages instead. The tensors alive at the start (weights, quantization state, optimizer
state) are counted from the start; while the mode is active, every storage an operator creates is
added when it appears and taken off when it is freed (a weak reference's callback, the approach of
torch's own `MemTracker`, which cannot follow a training loop of several steps).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from .sharding import local_tensor


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, and the tensors quantized weights keep beside their data (bitsandbytes'
    absmax and code, nested ones under double quantization)."""
    tensors = list(module.parameters()) + list(module.buffers())
    for param in module.parameters():
        tensors += _attribute_tensors(getattr(param, "quant_state", None), depth=3)
        tensors += _attribute_tensors(getattr(param, "SCB", None), depth=0)
    return tensors


def _attribute_tensors(value, depth: int) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if value is None or depth == 0 or not hasattr(value, "__dict__"):
        return []
    return [t for item in vars(value).values() for t in _attribute_tensors(item, depth - 1)]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


class TensorMemory(TorchDispatchMode):
    """`with TensorMemory(existing): ...` then `.peak` (bytes). Each storage counts once, whatever
    views of it exist; tensors on other devices (a GPU's have their own counter) are not counted.
    `current` is what is live now, e.g. to split a peak into its parts."""

    def __init__(self, existing: Iterable[torch.Tensor] = (), device: str = "cpu"):
        super().__init__()
        self.device = device  # "meta": the planner's count of a step run on shapes alone (plan/)
        self._storages = WeakIdKeyDictionary()
        self.current = 0
        for tensor in existing:
            self._count(tensor)
        self.peak = self.current

    def _count(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device:
            return
        tensor = local_tensor(tensor)  # an FSDP parameter: the shard this process holds
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse tensors and wrapper subclasses have no storage of their own to count
        if storage in self._storages:
            return
        size = [storage.nbytes()]  # mutable: FSDP resizes storages in place (see _follow_fsdp_storage)
        self._storages[storage] = (weakref.ref(storage, partial(self._freed, size)), size)
        self.current += size[0]

    def _freed(self, size: list[int], _ref) -> None:
        self.current -= size[0]

    def _resized(self, storage) -> None:
        entry = self._storages.get(storage)
        if entry is None:
            return
        new = storage.nbytes()
        self.current += new - entry[1][0]
        entry[1][0] = new
        self.peak = max(self.peak, self.current)

    def __enter__(self):
        self._undo = _follow_fsdp_storage(self)
        return super().__enter__()

    def __exit__(self, *exc):
        for undo in self._undo:
            undo()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._count(tensor)
        self.peak = max(self.peak, self.current)
        return out


def _follow_fsdp_storage(memory: TensorMemory) -> list:
    """FSDP2 frees a layer's gathered weights by resizing their storage to 0 bytes, and grows it back for
    the next all-gather (`free_storage` and `alloc_storage` in its private `_fsdp_param`, called there
    and from `_fsdp_param_group`). Anywhere else a storage keeps its size, so only these two calls
    need following; they are wrapped while the measure runs. Returns the undo functions."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    except ImportError:
        return []
    undo = []
    for module in (_fsdp_param, _fsdp_param_group):
        for name in ("free_storage", "alloc_storage"):
            original = getattr(module, name, None)
            if original is None:
                continue

            def wrapped(tensor, _original=original):
                _original(tensor)
                memory._resized(tensor.untyped_storage())

            setattr(module, name, wrapped)
            undo.append(partial(setattr, module, name, original))
    return undo
