"""Sheared-LLaMA's learned masks over a whole model, and how they act in its forward pass.

One hard-concrete gate set per mask type, created only where the target is smaller than the source:

  - "layer":        one gate per decoder layer;
  - "head":         per layer, one gate per key/value group ("kv-group", its query heads share it)
                    or per query head ("q-head", equal numbers kept in every group at the end);
  - "intermediate": per layer, one gate per MLP channel;
  - "hidden":       one gate per residual channel, shared by the whole model.

Where the gates act is the official code's placement, in the conventions of `structure/masks.py`:
head gates scale the o_proj input per head, intermediate gates the down_proj input, layer and
hidden gates the o_proj and down_proj outputs; hidden gates also scale the embeddings, and every
RMSNorm averages over the channels whose gate is non-zero, which is what it computes once they are
cut. The gates of one forward pass are computed once, by a pre-hook on the `*ForCausalLM` module,
and only read by the per-module hooks: with gradient checkpointing a layer runs again during
backward and must see the very same sample. Call backward before the next forward for that reason.

The caller trains: LM loss + `lagrangian(step)`, minimised over the model and `mask_parameters()`
and maximised over `lagrangian_parameters()` (e.g. `AdamW(..., maximize=True)`). Then `final()`
gives boolean `Masks` of exactly the target shape, `fold_into` moves the soft kept values into the
weights, and `structure.surgery.cut` makes the smaller model, which computes what the masked model
computed in eval mode.

Every random draw (the initial log_alpha, each training forward's gate noise) comes from one CPU
generator seeded by `seed` alone, not from torch's global generator, so two runs with one seed sample
the same gates whatever else drew random numbers before or between (model loading, LoRA dropout,
evaluation); with several processes every process samples the same gates, as one process with the
whole batch would. The generator's state is `rng_state()`, checkpointed by the shear hooks.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .hard_concrete import HardConcrete
from ...structure.masks import MaskHooks, Masks, _rms_norm_over_kept
from .target import Target, layer_parameters, outer_parameters
from ...structure.units import Structure, base_linear, projection
from ...families import family_of
from ...modeling import unwrap

MASK_TYPES = ("layer", "head", "intermediate", "hidden")


class ShearMasks(nn.Module):
    """Learned masks that shrink a uniform `structure` to `target`; the target sparsity of the
    Lagrangian is warmed up linearly from 0 over `warmup_steps` (the official `get_target_sparsity`).
    λ1 starts at 0 and λ2 at `lambda2_init` (0 in the official code). `seed` alone decides the
    initial log_alpha and the sequence of sampled gates."""

    def __init__(self, structure: Structure, target: Target, warmup_steps: int, lambda2_init: float = 0.0,
                 seed: int = 0):
        super().__init__()
        if not structure.uniform:
            raise ValueError("learned masks need a source whose layers all have the same shape")
        self.structure, self.target, self.warmup_steps = structure, target, warmup_steps
        self.seed = seed
        self.generator = torch.Generator().manual_seed(_mask_seed(seed))
        self.distributions = nn.ModuleDict(_distributions(structure, target, self.generator))
        self.lambdas = nn.ParameterDict({
            f"lambda_{k}_{kind}": nn.Parameter(torch.tensor(0.0 if k == 1 else float(lambda2_init)))
            for kind in self.distributions for k in (1, 2)
        })
        self._current: dict[str, torch.Tensor | None] | None = None

    def init_from(self, priorities: dict[str, torch.Tensor]) -> None:
        """Start each gate set's log_alpha from an importance score ([rows, units] by mask type,
        higher = more important) instead of the tie; the scores also break final ties. Without a
        warm-up the masks start at the target (the best units kept), else with every unit kept."""
        for kind, priority in priorities.items():
            self.distributions[kind].init_from(priority, at_target=self.warmup_steps == 0)

    # ----------------------------------------------------------------- parameters
    def mask_parameters(self) -> list[nn.Parameter]:
        return [d.log_alpha for d in self.distributions.values()]

    def lagrangian_parameters(self) -> list[nn.Parameter]:
        return list(self.lambdas.values())

    def rng_state(self) -> torch.Tensor:
        """The state of the generator the gates are sampled from (for checkpoints)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    @property
    def _kv_group_unit(self) -> bool:
        return self.target.head_unit == "kv-group"

    # ----------------------------------------------------------------- gates in the forward pass
    def attach(self, model: nn.Module) -> MaskHooks:
        """Hook the masks into `model` (plain or PEFT-wrapped); the handle's `remove()` takes them off
        and its `suspended()` lets the unmasked model run (the source model, as a teacher)."""
        if Structure.of(model) != self.structure:
            raise ValueError("these masks were built for a model of another shape")
        hf = unwrap(model)
        family = family_of(hf)
        switch = MaskHooks()
        handles = switch._handles
        handles.append(hf.register_forward_pre_hook(self._refresh(switch)))
        types = self.distributions
        if "hidden" in types:
            handles.append(hf.model.embed_tokens.register_forward_hook(self._output_hook("embed", None, switch)))
            norms = [hf.model.norm] + [n for layer in hf.model.layers for n in family.norms_over_residual(layer)]
            handles += [norm.register_forward_hook(self._norm_hook(switch)) for norm in norms]
        for i, layer in enumerate(hf.model.layers):
            o_proj, down_proj = projection(layer, "o_proj"), projection(layer, "down_proj")
            if "head" in types:
                handles.append(o_proj.register_forward_pre_hook(self._input_hook("o_input", i, switch)))
                for name in ("q_proj", "k_proj"):  # OLMo 2: q/k norms over every head average over the kept
                    norm = family.projection_norm(layer, name)
                    if norm is not None:
                        handles.append(norm.register_forward_hook(self._projection_norm_hook(name, i, switch)))
            if "intermediate" in types:
                handles.append(down_proj.register_forward_pre_hook(self._input_hook("down_input", i, switch)))
            if "layer" in types or "hidden" in types:
                handles += [m.register_forward_hook(self._output_hook("residual", i, switch))
                            for m in (o_proj, down_proj)]
        return switch

    def _refresh(self, switch: MaskHooks):
        def hook(module: nn.Module, args) -> None:
            """Once per forward: sample the gates (training) or take the deterministic ones (eval). A
            suspended pass keeps the last sample, which a checkpointed backward may still recompute."""
            if switch.active:
                self._current = self._scales({kind: d.sample() if module.training else d.deterministic()
                                              for kind, d in self.distributions.items()})
        return hook

    def _scales(self, gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The gates as the per-module scale vectors the hooks multiply by."""
        layers, hidden = gates.get("layer"), gates.get("hidden")
        residual = None
        if layers is not None or hidden is not None:
            residual = torch.ones(self.structure.num_layers, self.structure.hidden, device=self._device)
            residual = residual * (layers.reshape(-1, 1) if layers is not None else 1)
            residual = residual * (hidden.reshape(1, -1) if hidden is not None else 1)
        heads = gates.get("head")
        return {
            "o_input": None if heads is None else self._per_query_head(heads).repeat_interleave(
                self.structure.head_dim, dim=1),
            "down_input": gates.get("intermediate"),
            "residual": residual,
            "embed": None if hidden is None else hidden.reshape(-1),
            "norm_keep": None if hidden is None else hidden.reshape(-1) != 0,
        }

    def _per_query_head(self, head_values: torch.Tensor) -> torch.Tensor:
        """[layers, units] -> [layers, query heads]: a kv group's value repeats over its query heads."""
        if self._kv_group_unit:
            return head_values.repeat_interleave(self.structure.layers[0].group_size, dim=-1)
        return head_values

    def _read(self, name: str, row: int | None) -> torch.Tensor:
        if self._current is None:
            raise RuntimeError("mask hooks ran without the model's forward (call the *ForCausalLM module)")
        scale = self._current[name]
        return scale if row is None else scale[row]

    def _input_hook(self, name: str, row: int, switch: MaskHooks):
        def hook(module, args):
            if not switch.active:
                return None
            x = args[0]
            return (x * self._read(name, row).to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
        return hook

    def _output_hook(self, name: str, row: int | None, switch: MaskHooks):
        def hook(module, args, output):
            if not switch.active:
                return None
            return output * self._read(name, row).to(device=output.device, dtype=output.dtype)
        return hook

    def _norm_hook(self, switch: MaskHooks):
        def hook(module, args, output):
            if not switch.active:
                return None
            return _rms_norm_over_kept(self._read("norm_keep", None), switch)(module, args, output)
        return hook

    def _projection_norm_hook(self, name: str, row: int, switch: MaskHooks):
        """A norm over a whole q or k projection, averaged over the rows of the heads whose gate is not zero."""
        def hook(module, args, output):
            if not switch.active:
                return None
            heads = self._read("o_input", row).reshape(-1, self.structure.head_dim)[:, 0] != 0  # per query head
            if name == "k_proj":
                shape = self.structure.layers[row]
                heads = heads.reshape(shape.num_kv_heads, shape.group_size).any(dim=1)
            keep = heads.repeat_interleave(self.structure.head_dim)
            return _rms_norm_over_kept(keep, switch)(module, args, output)
        return hook

    @property
    def _device(self) -> torch.device:
        return next(iter(self.distributions.values())).log_alpha.device

    # ----------------------------------------------------------------- Lagrangian
    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        """P(z > 0) of every unit, by mask type, as [rows, units]; differentiable."""
        return {kind: d.keep_probability() for kind, d in self.distributions.items()}

    def target_fraction(self, kind: str, step: int) -> torch.Tensor:
        """Kept fraction the Lagrangian aims at, per row: 1 at step 0, the target's after the warm-up."""
        d = self.distributions[kind]
        progress = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return 1.0 - (1.0 - d.keep.double() / d.size) * progress

    def lagrangian(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over mask types of mean over rows of λ1·(ŝ−t) + λ2·(ŝ−t)², ŝ the expected kept fraction.
        Rows a per-layer target leaves whole are not gated and not averaged over."""
        probabilities = self.keep_probabilities()
        loss = torch.zeros((), device=self._device)
        info: dict[str, float] = {}
        for kind, p in probabilities.items():
            d = self.distributions[kind]
            gated = ~d.full.to(self._device)
            target = self.target_fraction(kind, step).to(device=self._device, dtype=p.dtype)
            gap = (p.sum(dim=-1) / d.size - target)[gated]
            l1, l2 = self.lambdas[f"lambda_1_{kind}"], self.lambdas[f"lambda_2_{kind}"]
            loss = loss + (l1 * gap + l2 * gap.pow(2)).mean()
            info[f"expected_{kind}"] = p.sum(dim=-1)[gated].mean().item()
            info[f"target_{kind}"] = (target * d.size)[gated].mean().item()
            info[f"lambda_1_{kind}"], info[f"lambda_2_{kind}"] = l1.item(), l2.item()
        info["expected_parameters"] = self.expected_parameters(probabilities).item()
        return loss, info

    def expected_parameters(self, probabilities: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Expected parameter count of the model the masks would produce (float64, differentiable).

        Same formula as `target.target_parameters`, fed with expected unit counts; the masks are
        independent, so the expectation of each product of counts is the product of expectations.
        `probabilities` (by type, as from `keep_probabilities()`) defaults to the current ones.
        """
        p = {k: v.double() for k, v in (probabilities or self.keep_probabilities()).items()}
        s, shape = self.structure, self.structure.layers[0]
        full = torch.ones(s.num_layers, dtype=torch.float64, device=self._device)
        hidden = p["hidden"].sum() if "hidden" in p else torch.tensor(float(s.hidden), dtype=torch.float64,
                                                                      device=self._device)
        layer_keep = p["layer"].reshape(-1) if "layer" in p else full
        heads, kv_heads = full * shape.num_heads, full * shape.num_kv_heads
        if "head" in p:
            units = p["head"].sum(dim=-1)
            heads, kv_heads = (units * shape.group_size, units) if self._kv_group_unit else (units, kv_heads)
        intermediate = p["intermediate"].sum(dim=-1) if "intermediate" in p else full * shape.intermediate
        per_layer = layer_parameters(s, hidden, heads, kv_heads, intermediate)
        return outer_parameters(s, hidden) + (layer_keep * per_layer).sum()

    # ----------------------------------------------------------------- the end of pruning
    def final(self) -> tuple[Masks, dict]:
        """Boolean masks of exactly the target shape, and the soft values kept units carry in eval."""
        masks = Masks()
        values: dict = {"heads": {}, "channels": {}, "hidden": None, "layers": None}
        d = self.distributions
        if "layer" in d:
            masks.layers, values["layers"] = d["layer"].keep_mask()[0], d["layer"].deterministic()[0]
        if "hidden" in d:
            masks.hidden, values["hidden"] = d["hidden"].keep_mask()[0], d["hidden"].deterministic()[0]
        if "head" in d:
            keep, soft = self._per_query_head(d["head"].keep_mask()), self._per_query_head(d["head"].deterministic())
            for i in range(self.structure.num_layers):
                masks.heads[i], values["heads"][i] = keep[i], soft[i]
        if "intermediate" in d:
            keep, soft = d["intermediate"].keep_mask(), d["intermediate"].deterministic()
            for i in range(self.structure.num_layers):
                masks.channels[i], values["channels"][i] = keep[i], soft[i]
        masks.validate(self.structure)
        return masks, values

    @torch.no_grad()
    def fold_into(self, model: nn.Module, values: dict) -> None:
        """Multiply the soft kept values of `final()` into a plain model's weights, in place.

        Afterwards `cut(model, masks)` computes what the masked model computed in eval mode. Each
        scale moves to the weight whose output (or input) the hook scaled. With tied embeddings the
        lm_head would also see the hidden scale folded into the embeddings; dividing the final
        norm's weight by it on kept channels cancels that (the norm's output feeds only lm_head).
        """
        if hasattr(model, "get_base_model"):
            raise ValueError("fold_into needs a plain model: merge the LoRA first (surgery.merge_lora)")
        hf = unwrap(model)
        hidden, layers = values.get("hidden"), values.get("layers")
        head_dim = self.structure.head_dim
        for i, layer in enumerate(hf.model.layers):
            o_proj, down_proj = (base_linear(projection(layer, n)) for n in ("o_proj", "down_proj"))
            if i in values.get("heads", {}):
                _scale_columns(o_proj, values["heads"][i].repeat_interleave(head_dim))
            if i in values.get("channels", {}):
                _scale_columns(down_proj, values["channels"][i])
            residual = torch.ones(self.structure.hidden)
            if hidden is not None:
                residual = residual * hidden.cpu()
            if layers is not None:
                residual = residual * layers[i].cpu()
            if hidden is not None or layers is not None:
                _scale_rows(o_proj, residual)
                _scale_rows(down_proj, residual)
        if hidden is not None:
            embed = hf.model.embed_tokens.weight
            embed.mul_(hidden.to(embed.device, embed.dtype))
            if hf.lm_head.weight is embed:
                norm, kept = hf.model.norm.weight, hidden != 0
                norm[kept.to(norm.device)] /= hidden[kept].to(norm.device, norm.dtype)


def _mask_seed(seed: int) -> int:
    """A 63-bit seed for the masks' generator, a fixed function of the run's seed that differs from
    the seed itself (train() seeds torch's global generator, used by dropout, with the seed)."""
    digest = hashlib.blake2b(f"shear-masks,{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _distributions(structure: Structure, target: Target, generator: torch.Generator) -> dict[str, HardConcrete]:
    """The gate sets in MASK_TYPES order, initialised from `generator` in that order. Head and channel
    gates are per layer, each layer keeping its own count where the target is per layer."""
    shape, n = structure.layers[0], structure.num_layers
    made = {}
    if target.layers < n:
        made["layer"] = HardConcrete(1, n, target.layers, generator=generator)
    # per row: each source layer's kept heads, kv heads and channels (a uniform target's layer pruning
    # removes whole rows after the fact, so every row then aims at the one shape)
    per_layer = target.per_layer or [(target.heads, target.kv_heads, target.intermediate)] * n
    heads, kv_heads, intermediate = (list(column) for column in zip(*per_layer))
    if min(heads) < shape.num_heads:
        made["head"] = (HardConcrete(n, shape.num_kv_heads, kv_heads, generator=generator)
                        if target.head_unit == "kv-group"
                        else HardConcrete(n, shape.num_heads, heads, groups=shape.num_kv_heads,
                                          generator=generator))
    if min(intermediate) < shape.intermediate:
        made["intermediate"] = HardConcrete(n, shape.intermediate, intermediate, generator=generator)
    if target.hidden < structure.hidden:
        made["hidden"] = HardConcrete(1, structure.hidden, target.hidden, generator=generator)
    return {kind: made[kind] for kind in MASK_TYPES if kind in made}


def _scale_columns(linear: nn.Module, scale: torch.Tensor) -> None:
    linear.weight.mul_(scale.to(linear.weight.device, linear.weight.dtype).reshape(1, -1))


def _scale_rows(linear: nn.Module, scale: torch.Tensor) -> None:
    linear.weight.mul_(scale.to(linear.weight.device, linear.weight.dtype).reshape(-1, 1))
    if linear.bias is not None:
        linear.bias.mul_(scale.to(linear.bias.device, linear.bias.dtype))
