"""What a model family tells the core: where its units live and what must be cut with them.

The core (scores, masks, surgery, LoRA merge, export, planner) speaks of seven projections by their
Llama names: `q_proj`, `k_proj`, `v_proj`, `o_proj` (a query head is rows of q and columns of o, a
key/value head rows of k and v) and `gate_proj`, `up_proj`, `down_proj` (an MLP channel is a row of
gate and up and a column of down). A family says where each of them sits inside a decoder layer, and
which other weights go with a unit:

- norms over the residual stream (cut with hidden channels: every family has an input and a
  post-attention norm, Gemma 2 and 3 two more around the MLP, OLMo 2 only the two after each block);
- norms over one head's dimensions (Qwen3, Gemma 3 q/k norms): shared by every head, never cut;
- norms over a projection's whole output (OLMo 2's q/k norms span every head): sliced with the
  projection's rows, and while masked they normalise over the kept rows only;
- fused projections (Phi-3's `qkv_proj` and `gate_up_proj`): split into one linear per projection
  while prunetune works on the model, fused back when it is written, so every criterion, mask, LoRA
  and cut sees the same seven projections;
- config lists with one entry per layer (`layer_types`, SmolLM3's `no_rope_layers`): cut with layers.

A new family is one small module: a `Family` with the fields that differ from Llama's. A mixture of
experts (moe.py) says where its router and experts live, and its layers have attention's four
projections only; the core keeps asking the family and never a model type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .moe import MoeLayout

PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_PROJECTIONS = {name: f"{'self_attn' if name in PROJECTION_NAMES[:4] else 'mlp'}.{name}"
                     for name in PROJECTION_NAMES}


@dataclass(frozen=True)
class Family:
    name: str  # what the docs and messages call it, e.g. "Gemma 2"
    model_types: tuple[str, ...]  # config.model_type values it covers
    projections: dict[str, str] = field(default_factory=lambda: dict(LLAMA_PROJECTIONS))
    residual_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_dim_norms: tuple[str, ...] = ()  # over one head's dimensions: shared, never cut
    projection_norms: dict[str, str] = field(default_factory=dict)  # projection -> norm over its whole output
    # fused module path -> the projections it holds, in the order of its output rows
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layer_lists: tuple[str, ...] = ("layer_types",)  # config lists with one entry per decoder layer
    # why hidden channels cannot be cut (None: they can)
    no_hidden_cut: str | None = None
    # why attention heads cannot be cut (None: they can)
    no_head_cut: str | None = None
    # why every layer must keep one shape (None: layers may differ, through prunetune's loader and plugins)
    uniform_only: str | None = None
    moe: "MoeLayout | None" = None  # where a mixture of experts keeps its router and experts (moe.py)

    @property
    def default_units(self) -> str:
        """What `prune` removes when its units are not named: attention heads and MLP channels, or on a
        mixture of experts heads (where this family cuts them), whole experts and expert channels, the
        budget shared between them by measurement."""
        if self.moe is None:
            return "heads,channels"
        return "experts,expert-channels" if self.no_head_cut else "heads,experts,expert-channels"

    @property
    def projection_names(self) -> tuple[str, ...]:
        """The projections every decoder layer has: all seven, or attention's four where the MLP is a
        mixture of experts (whose units are experts and their channels, not projections)."""
        return tuple(name for name in PROJECTION_NAMES if name in self.projections)

    # -- where things are ----------------------------------------------------------------------
    def projection(self, layer: nn.Module, name: str) -> nn.Module:
        owner, attr = self.projection_owner(layer, name)
        return getattr(owner, attr)

    def projection_owner(self, layer: nn.Module, name: str) -> tuple[nn.Module, str]:
        """The module that holds projection `name` as an attribute, and that attribute's name."""
        if name not in self.projections:
            raise ValueError(f"{self.name} has no {name}: its MLP is a mixture of experts (prunetune.families.moe)")
        owner, attr = _resolve(layer, self.projections[name])
        if isinstance(owner, nn.Linear):  # a fused projection not split yet
            raise ValueError(f"{self.name}'s fused projections are not split; call prunetune.families.prepare(model) "
                             "first (prunetune.load_model does)")
        return owner, attr

    def norms_over_residual(self, layer: nn.Module) -> list[nn.Module]:
        return [getattr(layer, name) for name in self.residual_norms]

    def projection_norm(self, layer: nn.Module, name: str) -> nn.Module | None:
        """The norm over projection `name`'s whole output (OLMo 2's q/k norms), or None."""
        path = self.projection_norms.get(name)
        return None if path is None else getattr(*_resolve(layer, path))

    # -- fused projections ---------------------------------------------------------------------
    def split_fused(self, model: nn.Module) -> None:
        """Replace each fused projection by one linear per projection (a `Fused` container), in place."""
        for layer in model.model.layers:
            for path, names in self.fused.items():
                owner, attr = _resolve(layer, path)
                module = getattr(owner, attr)
                if isinstance(module, Fused):
                    continue
                setattr(owner, attr, Fused.split(module, names, self.fused_widths(layer, path, module)))

    def join_fused(self, model: nn.Module) -> None:
        """Fuse the split projections back into one linear each (the layout the family's loaders read)."""
        for layer in model.model.layers:
            for path in self.fused:
                owner, attr = _resolve(layer, path)
                module = getattr(owner, attr)
                if isinstance(module, Fused):
                    setattr(owner, attr, module.joined())

    def fused_widths(self, layer: nn.Module, path: str, module: nn.Module) -> list[int]:
        """How many output rows of a fused projection belong to each of its projections: equal shares
        (gate and up); a family whose fused rows differ in width (Phi-3's q, k, v) overrides this."""
        names = self.fused[path]
        if module.out_features % len(names):
            raise ValueError(f"{self.name}: {path} has {module.out_features} rows, not {len(names)} equal parts")
        return [module.out_features // len(names)] * len(names)

    # -- the config after a cut ----------------------------------------------------------------
    def cut_layer_lists(self, config, keep: list[bool]) -> None:
        """Drop the removed layers' entries from every per-layer config list."""
        for name in self.layer_lists:
            values = getattr(config, name, None)
            if values and len(values) == len(keep):
                setattr(config, name, [v for v, k in zip(values, keep) if k])

    def after_cut(self, layer: nn.Module, num_heads: int, num_kv_heads: int, intermediate: int) -> None:
        """Keep the attributes a family's forward reads in step with its new shapes."""
        attn = layer.self_attn
        mlp = self.moe.block(layer) if self.moe is not None else layer.mlp
        attn.num_key_value_groups = num_heads // num_kv_heads
        for owner, attr, value in ((attn, "num_heads", num_heads), (attn, "num_key_value_heads", num_kv_heads),
                                   (mlp, "intermediate_size", intermediate)):
            if hasattr(owner, attr):
                setattr(owner, attr, value)


def _resolve(layer: nn.Module, path: str) -> tuple[nn.Module, str]:
    parts = path.split(".")
    owner = layer
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


class Fused(nn.Module):
    """A fused projection split into one linear per projection; its output is theirs, concatenated, so
    the family's own forward (which splits the fused output) runs unchanged."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)

    @classmethod
    def split(cls, linear: nn.Linear, names: tuple[str, ...], widths: list[int]) -> "Fused":
        if sum(widths) != linear.out_features:
            raise ValueError(f"a fused projection of {linear.out_features} rows cannot hold {widths}")
        parts, start = {}, 0
        for name, width in zip(names, widths):
            part = nn.Linear(linear.in_features, width, bias=linear.bias is not None,
                             device=linear.weight.device, dtype=linear.weight.dtype)
            part.weight = nn.Parameter(linear.weight.data[start:start + width].clone(),
                                       requires_grad=linear.weight.requires_grad)
            if linear.bias is not None:
                part.bias = nn.Parameter(linear.bias.data[start:start + width].clone(),
                                         requires_grad=linear.bias.requires_grad)
            parts[name] = part
            start += width
        return cls(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([module(x) for module in self.children()], dim=-1)

    def joined(self) -> nn.Linear:
        parts = [getattr(module, "base_layer", module) for module in self.children()]
        first = parts[0]
        linear = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                           device=first.weight.device, dtype=first.weight.dtype)
        linear.weight = nn.Parameter(torch.cat([p.weight.data for p in parts]), requires_grad=False)
        if first.bias is not None:
            linear.bias = nn.Parameter(torch.cat([p.bias.data for p in parts]), requires_grad=False)
        return linear
