"""Experts and expert channels: the units of a mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE).

Masked and cut, the model computes the same thing:

  - a removed expert: the router picks its top-k among the kept experts only, with the router's own
    code run on the kept rows of its weight, so the routing weights are renormalised exactly as the
    cut router will (a zeroed expert would still be picked and take a share of the weight);
  - a removed channel of one expert: its gate row is zeroed (SiLU(0) = 0, so the channel adds nothing
    through down), which is what the cut expert computes.

Stock loaders read one expert count and one width from the config, so every layer keeps the same
number of experts (chosen per layer) and every expert the same number of channels (chosen per expert).
An expert no calibration token was routed to goes first, whatever the criterion says of its weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..families import family_of
from ..modeling import eval_mode, unwrap
from .units import Structure, decoder_layers, moe_parts


# -- routing ---------------------------------------------------------------------------------------

@dataclass
class Routing:
    """How many times each expert of each layer was picked (one count per token and top-k slot)."""

    counts: list[torch.Tensor] = field(default_factory=list)  # per layer: [experts], int64
    tokens: int = 0  # tokens routed through each layer

    def summed(self, accelerator) -> "Routing":
        """Every process's counts added: under data parallelism each process routes its own share of the
        batch, so one process's counts alone would call an expert another process used never routed.
        Every process must call it (a collective)."""
        if accelerator.num_processes == 1 or not self.counts:
            return self
        counts = accelerator.reduce(torch.stack(self.counts).to(accelerator.device), reduction="sum").cpu()
        tokens = accelerator.reduce(torch.tensor([self.tokens], device=accelerator.device), reduction="sum")
        return Routing(counts=list(counts.unbind()), tokens=int(tokens.item()))

    def record(self, top_k: int) -> dict:
        never = [[i, e] for i, c in enumerate(self.counts) for e in (c == 0).nonzero().flatten().tolist()]
        return {"tokens": self.tokens, "top_k": top_k, "counts": [c.tolist() for c in self.counts],
                "never_routed": never}


@contextlib.contextmanager
def count_routing(model: nn.Module, with_grad_only: bool = False):
    """Count, while the block runs, which experts every router picks in each forward pass of the model:
    every pass, or with `with_grad_only` the passes that build a gradient (training's, not a
    self-teacher's or an evaluation's, which run without). A checkpointed layer's recomputation during
    the backward is not a pass of the model and is not counted again."""
    routing = Routing()
    in_pass = [False]  # set while the decoder stack's own forward runs
    stack = unwrap(model).model
    handles = [stack.register_forward_pre_hook(lambda module, args: in_pass.__setitem__(0, True)),
               stack.register_forward_hook(lambda module, args, output: in_pass.__setitem__(0, False),
                                           always_call=True)]
    for layer in decoder_layers(model):
        parts = moe_parts(layer)
        if parts is None:
            continue
        counts = torch.zeros(parts[1].down_proj.shape[0], dtype=torch.long)
        routing.counts.append(counts)

        def hook(module, args, output, counts=counts, first=not routing.counts[:-1]):
            if not in_pass[0] or (with_grad_only and not torch.is_grad_enabled()):
                return
            indices = output[2].detach()
            counts += torch.bincount(indices.flatten().cpu(), minlength=len(counts))[: len(counts)]
            if first:
                routing.tokens += indices.shape[0]
        handles.append(parts[0].register_forward_hook(hook))
    try:
        yield routing
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def routing_on(model: nn.Module, batches: list[torch.Tensor]) -> Routing:
    """Which experts the routers pick on `batches` (one forward pass each, in eval mode)."""
    device = unwrap(model).get_input_embeddings().weight.device
    with count_routing(model) as routing, eval_mode(model):
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
    return routing


# -- masks in the forward pass ---------------------------------------------------------------------

def _routed_among(kept: torch.Tensor, switch):
    """A router forward hook: route among the `kept` experts only (the router's code on their rows)."""
    kept_ids = kept.nonzero().flatten()

    def hook(router, args, output):
        if not switch.active:
            return None
        sub = _sub_router(router, kept_ids)
        logits, weights, indices = type(router).forward(sub, args[0])
        full = torch.full((*logits.shape[:-1], len(kept)), torch.finfo(logits.dtype).min, dtype=logits.dtype,
                          device=logits.device)
        full[..., kept_ids.to(logits.device)] = logits
        return full, weights, kept_ids.to(indices.device)[indices]
    return hook


def _sub_router(router: nn.Module, rows: torch.Tensor) -> nn.Module:
    """A shallow stand-in for `router` that holds only `rows` of its weight (and bias)."""
    sub = nn.Module.__new__(type(router))
    sub.__dict__.update(router.__dict__)
    sub._parameters = {name: (p.index_select(0, rows.to(p.device)) if p is not None else None)
                       for name, p in router._parameters.items()}
    sub.num_experts = len(rows)
    return sub


class _ZeroGateRows(nn.Module):
    """A parametrization of `gate_up_proj` [experts, 2 x width, hidden] that zeroes the gate rows of
    removed channels while `switch` is active."""

    def __init__(self, keep: torch.Tensor, switch):
        super().__init__()
        self.register_buffer("scale", torch.cat([keep, torch.ones_like(keep)], dim=1).float(), persistent=False)
        self.switch = switch

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.switch.active:
            return weight
        return weight * self.scale.to(device=weight.device, dtype=weight.dtype)[:, :, None]


class _GateRowsWhileRunning:
    """Zero the removed channels' gate rows for the experts' forward pass only: the parametrization is
    registered just before the experts run and removed just after. Under LoRA, PEFT registers its own
    parametrization of the same parameter (the adapter's delta) for that same pass, around this module;
    registered after it, the zeroing applies to the adapted weight, W + s·B·A, as the cut will."""

    def __init__(self, experts: nn.Module, mask: _ZeroGateRows):
        self.experts, self.mask = experts, mask
        self.handles = [experts.register_forward_pre_hook(self._register),
                        experts.register_forward_hook(self._unregister, always_call=True)]

    def _register(self, module, args) -> None:
        parametrize.register_parametrization(module, "gate_up_proj", self.mask, unsafe=True)

    def _unregister(self, module, args, output) -> None:
        if not parametrize.is_parametrized(module, "gate_up_proj"):
            return
        chain = module.parametrizations["gate_up_proj"]
        if len(chain) == 1:
            parametrize.remove_parametrizations(module, "gate_up_proj", leave_parametrized=False)
            return
        for i in reversed(range(len(chain))):  # PEFT's own stays until PEFT removes it
            if chain[i] is self.mask:
                del chain[i]
                break

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def expert_hooks(layer: nn.Module, keep_experts: torch.Tensor | None, keep_channels: torch.Tensor | None,
                 switch) -> list:
    """Attach one layer's expert and expert-channel masks; returns handles with `.remove()`."""
    router, experts = moe_parts(layer)
    handles = []
    if keep_experts is not None and not keep_experts.all():
        handles.append(router.register_forward_hook(_routed_among(keep_experts, switch)))
    if keep_channels is not None and not keep_channels.all():
        handles.append(_GateRowsWhileRunning(experts, _ZeroGateRows(keep_channels, switch)))
    return handles


# -- the cut ---------------------------------------------------------------------------------------

@torch.no_grad()
def cut_experts(layer: nn.Module, keep_experts: torch.Tensor | None, keep_channels: torch.Tensor | None) -> None:
    """Remove one layer's dropped experts (weights and router rows) and expert channels, in place."""
    router, experts = moe_parts(layer)
    count, _, width = experts.down_proj.shape
    kept = (keep_experts if keep_experts is not None else torch.ones(count, dtype=torch.bool)).nonzero().flatten()
    channels = keep_channels if keep_channels is not None else torch.ones(count, width, dtype=torch.bool)
    gate_up, down = [], []
    for e in kept.tolist():
        rows = channels[e].nonzero().flatten().to(experts.down_proj.device)
        gate_up.append(experts.gate_up_proj.data[e].index_select(0, torch.cat([rows, rows + width])))
        down.append(experts.down_proj.data[e].index_select(1, rows))
    experts.gate_up_proj = nn.Parameter(torch.stack(gate_up), requires_grad=experts.gate_up_proj.requires_grad)
    experts.down_proj = nn.Parameter(torch.stack(down), requires_grad=experts.down_proj.requires_grad)
    router.weight = nn.Parameter(router.weight.data.index_select(0, kept.to(router.weight.device)),
                                 requires_grad=router.weight.requires_grad)
    for module in (experts, router, family_of(layer).moe.block(layer)):
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = experts.down_proj.shape[2]


def sync_expert_config(model: nn.Module, structure: Structure) -> None:
    """Write the experts' (uniform) count and width into the config."""
    layout = family_of(model).moe
    if layout is None or not structure.layers:
        return
    first = structure.layers[0]
    layout.sync_config(model.config, first.experts, first.intermediate)


# -- which experts and channels go -----------------------------------------------------------------

def removal_order(expert_scores: torch.Tensor, counts: torch.Tensor | None) -> list[int]:
    """A layer's experts, first to go first: never routed to before routed, then by score (ties: the
    later expert first)."""
    routed = counts if counts is not None else torch.ones(len(expert_scores), dtype=torch.long)
    return sorted(range(len(expert_scores)), key=lambda e: (bool(routed[e] > 0), float(expert_scores[e]), -e))


def expert_masks(structure: Structure, scores, routing: Routing | None, layers: list[int], removed: int,
                 width: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer, drop `removed` experts and keep `width` channels in every expert (each its best)."""
    experts, channels = {}, {}
    for i in layers:
        shape = structure.layers[i]
        if removed:
            counts = routing.counts[i] if routing is not None and routing.counts else None
            keep = torch.ones(shape.experts, dtype=torch.bool)
            keep[removal_order(scores[i].experts, counts)[:removed]] = False
            experts[i] = keep
        if width < shape.intermediate:
            best = scores[i].expert_channels.topk(width, dim=1).indices
            channels[i] = torch.zeros(shape.experts, shape.intermediate, dtype=torch.bool).scatter_(1, best, True)
    return experts, channels
