"""Keep-masks over a model's units, and how they act in the forward pass.

A mask multiplies the *output* of the module at a projection's place, so when PEFT has wrapped
the projection the product covers base plus LoRA, and no weight-sized temporary is ever built.
Where outputs alone are not enough for masked == pruned, the mask acts one step later:

  - query heads: the attention output of a head is zeroed at the o_proj input (a zeroed query
    still attends uniformly over the values, so masking q alone would not remove the head);
    q, k and v outputs are masked too, as in LoRAPrune's code, so LoRA receives no gradient
    through a removed head.
  - hidden channels: the embeddings, o_proj and down_proj outputs are masked so the residual stream
    is zero in removed channels, and every RMSNorm averages over the kept channels only, which is
    what the norm computes after the channels are cut.
  - layers: o_proj and down_proj outputs are multiplied by the layer's keep value, so a removed
    layer passes its input through unchanged.
  - a norm over a whole projection's output (OLMo 2's q/k norms) averages over the kept heads' rows
    only, as it will once the heads are cut.
  - experts and expert channels (a mixture of experts): the router routes among the kept experts,
    and a removed channel's gate row is zeroed (structure/experts.py).
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import torch
from torch import nn

from ..families import family_of
from ..modeling import unwrap
from .experts import expert_hooks
from .units import Structure, decoder_layers, projection


@dataclass
class Masks:
    """Keep-masks, True = keep, indexed by the source model's layer numbers.

    A layer missing from `heads` or `channels`, or `hidden`/`layers` left None, keeps everything.
    `heads[i]` is over query heads; a key/value head is kept while any query head of its group is.
    """

    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    channels: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    layers: torch.Tensor | None = None
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # [experts] per mixture-of-experts layer
    expert_channels: dict[int, torch.Tensor] = field(default_factory=dict)  # [experts, width]

    @staticmethod
    def heads_from_kv(kv_keep: torch.Tensor, group_size: int) -> torch.Tensor:
        """Query-head mask that keeps every query head of each kept key/value head."""
        return kv_keep.repeat_interleave(group_size)

    def kv_heads(self, layer: int, structure: Structure) -> torch.Tensor | None:
        heads = self.heads.get(layer)
        if heads is None:
            return None
        shape = structure.layers[layer]
        return heads.reshape(shape.num_kv_heads, shape.group_size).any(dim=1)

    def layer_kept(self, layer: int) -> bool:
        return self.layers is None or bool(self.layers[layer])

    def validate(self, structure: Structure) -> None:
        """Raise ValueError unless the masks describe a model stock transformers can run."""
        if self.layers is not None:
            if self.layers.shape != (structure.num_layers,):
                raise ValueError(f"layer mask has shape {tuple(self.layers.shape)}, expected ({structure.num_layers},)")
            if not self.layers.any():
                raise ValueError("the layer mask removes every layer")
        if self.hidden is not None:
            if self.hidden.shape != (structure.hidden,):
                raise ValueError(f"hidden mask has shape {tuple(self.hidden.shape)}, expected ({structure.hidden},)")
            if not self.hidden.any():
                raise ValueError("the hidden mask removes every channel")
        for i, keep in self.heads.items():
            shape = structure.layers[i]
            if keep.shape != (shape.num_heads,):
                raise ValueError(f"layer {i}: head mask has shape {tuple(keep.shape)}, expected ({shape.num_heads},)")
            per_group = keep.reshape(shape.num_kv_heads, shape.group_size).sum(dim=1)
            kept_groups = per_group[per_group > 0]
            if len(kept_groups) == 0:
                raise ValueError(f"layer {i}: the head mask removes every head (remove the layer instead)")
            if (kept_groups != kept_groups[0]).any():
                raise ValueError(
                    f"layer {i}: kept query heads per key/value group differ ({per_group.tolist()}); "
                    "grouped-query attention needs the same number in every kept group"
                )
        for i, keep in self.channels.items():
            shape = structure.layers[i]
            if keep.shape != (shape.intermediate,) or shape.experts:
                raise ValueError(f"layer {i}: channel mask has shape {tuple(keep.shape)}, "
                                 f"expected ({shape.intermediate},)"
                                 + (" and a dense MLP (this layer is a mixture of experts)" if shape.experts else ""))
            if not keep.any():
                raise ValueError(f"layer {i}: the channel mask removes every MLP channel")
        for i, keep in self.experts.items():
            shape = structure.layers[i]
            if keep.shape != (shape.experts,):
                raise ValueError(f"layer {i}: expert mask has shape {tuple(keep.shape)}, expected ({shape.experts},)")
            if int(keep.sum()) < structure.top_k:
                raise ValueError(f"layer {i}: the expert mask keeps {int(keep.sum())} experts, fewer than the "
                                 f"{structure.top_k} each token is routed to")
        for i, keep in self.expert_channels.items():
            shape = structure.layers[i]
            if keep.shape != (shape.experts, shape.intermediate):
                raise ValueError(f"layer {i}: expert channel mask has shape {tuple(keep.shape)}, expected "
                                 f"({shape.experts}, {shape.intermediate})")
            per_expert = keep.sum(dim=1)
            if (per_expert != per_expert[0]).any() or not per_expert[0]:
                raise ValueError(f"layer {i}: every expert must keep the same number of channels, at least one "
                                 f"({per_expert.tolist()})")
        moe_layers = [i for i, shape in enumerate(structure.layers) if shape.experts and self.layer_kept(i)]
        kept_shapes = {(int(self.experts[i].sum()) if i in self.experts else structure.layers[i].experts,
                        int(self.expert_channels[i][0].sum()) if i in self.expert_channels
                        else structure.layers[i].intermediate) for i in moe_layers}
        if len(kept_shapes) > 1:
            raise ValueError(f"the layers would keep different expert counts or widths {sorted(kept_shapes)}; a "
                             "mixture of experts' config holds one of each (no engine loads per-layer counts): "
                             "keep the same number of experts in every layer and of channels in every expert")

    def kept_summary(self, structure: Structure) -> dict:
        """Kept units as plain lists (for prunetune.json and for moving adapters between shapes)."""
        layers = []
        for i, shape in enumerate(structure.layers):
            if not self.layer_kept(i):
                continue
            heads = self.heads.get(i, torch.ones(shape.num_heads, dtype=torch.bool))
            kv = self.kv_heads(i, structure)
            kv = torch.ones(shape.num_kv_heads, dtype=torch.bool) if kv is None else kv
            channels = self.channels.get(i, torch.ones(0 if shape.experts else shape.intermediate, dtype=torch.bool))
            entry = {
                "layer": i,
                "heads": _indices(heads),
                "kv_heads": _indices(kv),
                "channels": _indices(channels),
                "num_heads": int(heads.sum()),
                "num_kv_heads": int(kv.sum()),
                "num_channels": int(channels.sum()),
            }
            if shape.experts:
                experts = self.experts.get(i, torch.ones(shape.experts, dtype=torch.bool))
                inside = self.expert_channels.get(i, torch.ones(shape.experts, shape.intermediate, dtype=torch.bool))
                entry |= {"experts": _indices(experts), "num_experts": int(experts.sum()),
                          "expert_channels": [_indices(inside[e]) for e in _indices(experts)],
                          "expert_width": int(inside[0].sum())}
            layers.append(entry)
        hidden = self.hidden if self.hidden is not None else torch.ones(structure.hidden, dtype=torch.bool)
        return {"layers": layers, "hidden": _indices(hidden), "num_hidden": int(hidden.sum())}

    @classmethod
    def from_summary(cls, summary: dict, structure: Structure) -> "Masks":
        """Inverse of `kept_summary`, against the source model's structure."""
        masks = cls()
        kept_layers = {entry["layer"] for entry in summary["layers"]}
        if len(kept_layers) < structure.num_layers:
            masks.layers = _bool_mask(structure.num_layers, sorted(kept_layers))
        for entry in summary["layers"]:
            i, shape = entry["layer"], structure.layers[entry["layer"]]
            if entry["num_heads"] < shape.num_heads:
                masks.heads[i] = _bool_mask(shape.num_heads, entry["heads"])
            if not shape.experts and entry["num_channels"] < shape.intermediate:
                masks.channels[i] = _bool_mask(shape.intermediate, entry["channels"])
            if shape.experts and entry["num_experts"] < shape.experts:
                masks.experts[i] = _bool_mask(shape.experts, entry["experts"])
            if shape.experts and entry["expert_width"] < shape.intermediate:
                inside = torch.zeros(shape.experts, shape.intermediate, dtype=torch.bool)
                for e, kept in zip(entry["experts"], entry["expert_channels"]):
                    inside[e, kept] = True
                inside[[e for e in range(shape.experts) if e not in entry["experts"]], :entry["expert_width"]] = True
                masks.expert_channels[i] = inside
        if summary["num_hidden"] < structure.hidden:
            masks.hidden = _bool_mask(structure.hidden, summary["hidden"])
        return masks


def _indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def _bool_mask(size: int, keep: list[int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[keep] = True
    return mask


class MaskHooks:
    """Forward hooks that apply masks to a model; `remove()` (or leaving a `with`) takes them off,
    and inside `suspended()` they let every output through (the unpruned model, as a teacher)."""

    def __init__(self, handles: list | None = None):
        self._handles = handles if handles is not None else []
        self.active = True

    @contextlib.contextmanager
    def suspended(self):
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "MaskHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _scale_output(scale: torch.Tensor, switch: MaskHooks):
    def hook(module, args, output):
        if not switch.active:
            return None
        return output * scale.to(device=output.device, dtype=output.dtype)
    return hook


def _scale_input(scale: torch.Tensor, switch: MaskHooks):
    def hook(module, args):
        if not switch.active:
            return None
        x = args[0]
        return (x * scale.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
    return hook


def _rms_norm_over_kept(keep: torch.Tensor, switch: MaskHooks):
    """RMSNorm whose mean runs over the kept channels only (what the norm computes once the others are cut;
    the input elsewhere is left out of the mean whatever it holds)."""
    keep = keep.float()
    kept = keep.sum()

    def hook(module, args, output):
        if not switch.active:
            return None
        x = args[0]
        x32 = x.float()
        variance = (x32.pow(2) * keep.to(x32.device)).sum(-1, keepdim=True) / kept.to(x32.device)
        normed = x32 * torch.rsqrt(variance + module.variance_epsilon)
        return module.weight * normed.to(x.dtype)
    return hook


def apply_masks(model: nn.Module, masks: Masks) -> MaskHooks:
    """Attach `masks` to the modules now at each projection's place (wrap with PEFT first)."""
    structure = Structure.of(model)
    masks.validate(structure)
    hf = unwrap(model)
    family = family_of(hf)
    hooks = MaskHooks()
    handles = hooks._handles

    def out_hook(module, scale):
        handles.append(module.register_forward_hook(_scale_output(scale.float(), hooks)))

    hidden = masks.hidden
    if hidden is not None and family.no_hidden_cut:
        raise ValueError(f"{family.name}'s hidden channels cannot be masked: {family.no_hidden_cut}")
    if hidden is not None:
        out_hook(hf.model.embed_tokens, hidden)
        for norm in [hf.model.norm] + [n for layer in hf.model.layers for n in family.norms_over_residual(layer)]:
            handles.append(norm.register_forward_hook(_rms_norm_over_kept(hidden, hooks)))

    for i, layer in enumerate(decoder_layers(model)):
        head_dim = layer.self_attn.head_dim
        heads = masks.heads.get(i)
        if heads is not None:
            kv = masks.kv_heads(i, structure)
            rows = {"q_proj": heads.repeat_interleave(head_dim), "k_proj": kv.repeat_interleave(head_dim),
                    "v_proj": kv.repeat_interleave(head_dim)}
            for name, keep in rows.items():
                out_hook(projection(layer, name), keep)
                norm = family.projection_norm(layer, name)
                if norm is not None:
                    handles.append(norm.register_forward_hook(_rms_norm_over_kept(keep, hooks)))
            o_proj = projection(layer, "o_proj")
            handles.append(o_proj.register_forward_pre_hook(_scale_input(heads.repeat_interleave(head_dim).float(),
                                                                         hooks)))
        channels = masks.channels.get(i)
        if channels is not None:
            out_hook(projection(layer, "gate_proj"), channels)
            out_hook(projection(layer, "up_proj"), channels)
        if structure.layers[i].experts:
            handles.extend(expert_hooks(layer, masks.experts.get(i), masks.expert_channels.get(i), hooks))
        # What a layer adds to the residual stream: masked by hidden channels and by the layer's keep.
        residual = torch.ones(structure.hidden)
        if hidden is not None:
            residual = residual * hidden.float()
        if masks.layers is not None:
            residual = residual * masks.layers[i].float()
        if hidden is not None or masks.layers is not None:
            out_hook(projection(layer, "o_proj"), residual)
            out_hook(family.moe.block(layer) if structure.layers[i].experts else projection(layer, "down_proj"),
                     residual)
    return hooks
