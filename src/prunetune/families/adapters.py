"""PEFT LoRA adapters of a family with fused projections, in the layout its stock loaders read.

prunetune works on Phi-3 with `qkv_proj` and `gate_up_proj` split into one linear per projection
(base.py), so PEFT on that model saves `...self_attn.qkv_proj.q_proj.lora_A.weight`. Stock PEFT on a
stock Phi-3 adapts the fused `qkv_proj` itself. Both layouts hold the same update, exactly:

- join (split -> stock): the fused module's A is the parts' A matrices stacked (rank r_q + r_k + r_v)
  and its B holds the parts' B matrices on the block diagonal, so B·A has each part's update in that
  part's rows. The fused rank and alpha go into the config's rank/alpha patterns; where the parts'
  scalings differ, the ratio is folded into their B blocks. A part without an adapter (LoRA on q and v
  only) is a block of zero rows.
- split (stock -> split): each part takes its rows of the fused B. Where B is block-diagonal in equal
  blocks (as join writes it, and as an untrained B trivially is) each part takes back its own block and
  A rows, so a round trip keeps the ranks; otherwise every part keeps the whole A (still exact).

Every adapter prunetune writes is in the stock layout (`to_stock_layout`), and every adapter it loads
onto a split model goes through `load_peft`, which accepts either.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .base import Family

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# (layer index, fused module path inside the layer, family) -> the output rows of each of its projections
Widths = Callable[[int, str, Family], list[int]]


def read_adapter_files(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    directory = Path(directory)
    return load_file(str(directory / WEIGHTS_FILE)), json.loads((directory / CONFIG_FILE).read_text())


def write_adapter_files(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write an adapter directory as PEFT's save_pretrained lays it out."""
    from safetensors.torch import save_file

    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(Path(directory) / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def fused_family(keys) -> Family | None:
    """The family whose fused projections an adapter's tensor names mention (either layout), or None."""
    from . import FAMILIES

    for family in FAMILIES:
        if family.fused and any(re.search(rf"\.layers\.\d+\.{re.escape(path)}\.", key)
                                for key in keys for path in family.fused):
            return family
    return None


def widths_from_shapes(shapes, head_dim: int) -> Widths:
    """Widths of fused projections from per-layer unit counts (objects with num_heads, num_kv_heads and
    intermediate, e.g. LayerShape) and the head size."""
    def rows(name: str, shape) -> int:
        if name in ("gate_proj", "up_proj"):
            return shape.intermediate
        return (shape.num_heads if name == "q_proj" else shape.num_kv_heads) * head_dim

    def widths(layer: int, path: str, family: Family) -> list[int]:
        return [rows(name, shapes[layer]) for name in family.fused[path]]
    return widths


def widths_from_model(model: nn.Module) -> Widths:
    """Widths of fused projections as a split model holds them."""
    from ..modeling import unwrap

    layers = unwrap(model).model.layers

    def widths(layer: int, path: str, family: Family) -> list[int]:
        fused = layers[layer].get_submodule(path)
        return [getattr(part, "base_layer", part).out_features for part in fused.children()]
    return widths


# -- the two layouts -----------------------------------------------------------------------------

_SPLIT_KEY = (r"^(?P<module>.*\.layers\.(?P<layer>\d+)\.{path})\.(?P<part>\w+)"
              r"\.(?P<half>lora_A|lora_B)\.(?P<kind>weight|bias)$")
_STOCK_KEY = r"^(?P<module>.*\.layers\.(?P<layer>\d+)\.{path})\.(?P<half>lora_A|lora_B)\.(?P<kind>weight|bias)$"


def join(tensors: dict[str, torch.Tensor], config: dict, family: Family, widths: Widths
         ) -> tuple[dict[str, torch.Tensor], dict]:
    """Split layout -> stock layout (see the module's docstring). Tensors of other modules pass through."""
    out, groups = {}, {}
    for key, tensor in tensors.items():
        match = _match(_SPLIT_KEY, key, family)
        if match is None or match["part"] not in family.fused[match["path"]]:
            out[key] = tensor
            continue
        groups.setdefault((match["module"], int(match["layer"]), match["path"]), {}).setdefault(
            match["part"], {})[f"{match['half']}.{match['kind']}"] = tensor
    config = dict(config)
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    for (module, layer, path), parts in sorted(groups.items()):
        names = family.fused[path]
        present = [name for name in names if name in parts]
        scalings = {name: _scaling(config, _module_name(f"{module}.{name}")) for name in present}
        reference = scalings[present[0]]
        a_blocks, b_blocks, biases = [], [], []
        for name, rows in zip(names, widths(layer, path, family)):
            if name in parts:
                a, b = parts[name]["lora_A.weight"], parts[name]["lora_B.weight"] * (scalings[name] / reference)
                bias = parts[name].get("lora_B.bias")
                bias = None if bias is None else bias * (scalings[name] / reference)
            else:
                a = b = bias = None
            a_blocks.append(a)
            b_blocks.append((rows, b))
            biases.append((rows, bias))
        rank = sum(a.shape[0] for a in a_blocks if a is not None)
        a_fused = torch.cat([a for a in a_blocks if a is not None])
        b_fused = a_fused.new_zeros(sum(rows for rows, _ in b_blocks), rank)
        row = col = 0
        for rows, b in b_blocks:
            if b is not None:
                b_fused[row:row + rows, col:col + b.shape[1]] = b
                col += b.shape[1]
            row += rows
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a_fused, b_fused
        if any(bias is not None for _, bias in biases):
            out[f"{module}.lora_B.bias"] = torch.cat([a_fused.new_zeros(rows) if bias is None else bias
                                                      for rows, bias in biases])
        name = _module_name(module)
        ranks[name], alphas[name] = rank, _alpha_for(config, rank, reference)
    return out, _retarget(config, family, ranks, alphas, joined=True, modules=[m for m, _, _ in groups])


def split(tensors: dict[str, torch.Tensor], config: dict, family: Family, widths: Widths
          ) -> tuple[dict[str, torch.Tensor], dict]:
    """Stock layout -> split layout (see the module's docstring). Tensors of other modules pass through."""
    out, groups = {}, {}
    for key, tensor in tensors.items():
        match = _match(_STOCK_KEY, key, family)
        if match is None:
            out[key] = tensor
            continue
        groups.setdefault((match["module"], int(match["layer"]), match["path"]), {})[
            f"{match['half']}.{match['kind']}"] = tensor
    config = dict(config)
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    modules = []
    for (module, layer, path), held in sorted(groups.items()):
        names = family.fused[path]
        a, b, bias = held["lora_A.weight"], held["lora_B.weight"], held.get("lora_B.bias")
        rows = widths(layer, path, family)
        if sum(rows) != b.shape[0]:
            raise ValueError(f"{module}: the adapter's B has {b.shape[0]} rows, the model's {path} {sum(rows)}")
        scaling = _scaling(config, _module_name(module))
        blocks = _diagonal_blocks(b, rows, len(names))
        starts = [sum(rows[:i]) for i in range(len(rows))]
        for i, (name, start, width) in enumerate(zip(names, starts, rows)):
            part = f"{module}.{name}"
            cols = slice(None) if blocks is None else slice(i * blocks, (i + 1) * blocks)
            out[f"{part}.lora_A.weight"] = a[cols].clone()
            out[f"{part}.lora_B.weight"] = b[start:start + width, cols].clone()
            if bias is not None:
                out[f"{part}.lora_B.bias"] = bias[start:start + width].clone()
            rank = a.shape[0] if blocks is None else blocks
            ranks[_module_name(part)], alphas[_module_name(part)] = rank, _alpha_for(config, rank, scaling)
            modules.append(part)
    return out, _retarget(config, family, ranks, alphas, joined=False, modules=modules)


def _diagonal_blocks(b: torch.Tensor, rows: list[int], parts: int) -> int | None:
    """The block width if B is zero outside equal diagonal blocks (one per part), else None."""
    if b.shape[1] % parts:
        return None
    width, start = b.shape[1] // parts, 0
    for i, count in enumerate(rows):
        block = b[start:start + count]
        if block[:, :i * width].any() or block[:, (i + 1) * width:].any():
            return None
        start += count
    return width


def _match(pattern: str, key: str, family: Family) -> dict | None:
    for path in family.fused:
        match = re.match(pattern.format(path=re.escape(path)), key)
        if match:
            return match.groupdict() | {"path": path}
    return None


def _module_name(module: str) -> str:
    """A module's name in the model PEFT wraps (what rank/alpha patterns are matched against)."""
    return module.removeprefix(PEFT_PREFIX)


def _scaling(config: dict, module: str) -> float:
    """PEFT's LoRA scaling for `module` under `config`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _alpha_for(config: dict, rank: int, scaling: float) -> int | float:
    alpha = scaling * (math.sqrt(rank) if config.get("use_rslora") else rank)
    return round(alpha) if abs(alpha - round(alpha)) < 1e-9 else alpha


def _retarget(config: dict, family: Family, ranks: dict, alphas: dict, *, joined: bool, modules: list[str]) -> dict:
    """The config for the other layout: target modules renamed, rank and alpha patterns for the modules
    that changed (entries for the other layout's module names dropped; defaults left to r and alpha)."""
    fused_names = {path.rsplit(".", 1)[-1]: parts for path, parts in family.fused.items()}
    part_names = {part: fused for fused, parts in fused_names.items() for part in parts}
    stale = set(part_names) if joined else set(fused_names)

    def fresh(pattern: dict) -> dict:
        return {key: value for key, value in pattern.items() if key.rsplit(".", 1)[-1] not in stale}

    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        if joined:
            renamed = {part_names.get(name, name) for name in targets}
        else:
            renamed = {part for name in targets for part in fused_names.get(name, (name,))}
        config["target_modules"] = sorted(renamed)
    elif modules:  # a regular expression: name the adapted modules instead
        config["target_modules"] = sorted({_module_name(m) for m in modules})
    names = {_module_name(m) for m in modules}
    ranks, alphas = _compact(fresh(ranks), names), _compact(fresh(alphas), names)
    config["rank_pattern"] = {k: v for k, v in ranks.items() if v != config["r"]}
    config["alpha_pattern"] = {k: v for k, v in alphas.items() if v != config["lora_alpha"]}
    return config


def _compact(pattern: dict, modules: set[str]) -> dict:
    """One entry per module kind (`qkv_proj`) instead of one per layer, where every layer's value is the same."""
    by_kind: dict[str, set] = {}
    for key, value in pattern.items():
        if key in modules:
            by_kind.setdefault(key.rsplit(".", 1)[-1], set()).add(value)
    short = {kind: values.pop() for kind, values in by_kind.items() if len(values) == 1 and kind not in pattern}
    kept = {k: v for k, v in pattern.items() if not (k in modules and k.rsplit(".", 1)[-1] in short)}
    return kept | short


# -- directories ---------------------------------------------------------------------------------

def to_stock_layout(directory: str | Path, model: nn.Module) -> None:
    """Rewrite, in place, an adapter PEFT saved from a split model of a fused family into the layout stock
    PEFT reads on the stock model. Other families' adapters are left as they are."""
    from . import family_of

    family = family_of(model)
    if not family.fused:
        return
    tensors, config = read_adapter_files(directory)
    write_adapter_files(directory, *join(tensors, config, family, widths_from_model(model)))


def load_peft(model: nn.Module, directory: str | Path, **kwargs) -> nn.Module:
    """`PeftModel.from_pretrained(model, directory)` for a model prunetune loaded: an adapter in a fused
    family's stock layout is split to fit the split model first (through a temporary directory). PEFT
    loads non-strictly; a saved weight the model has no place for is a one-line error here instead of
    being dropped without a word."""
    from peft import PeftModel

    from . import family_of

    if not (Path(directory) / WEIGHTS_FILE).is_file():  # an older adapter_model.bin: PEFT's own loading is all we have
        return PeftModel.from_pretrained(model, str(directory), **kwargs)
    family = family_of(model)
    tensors, config = read_adapter_files(directory)
    if not (family.fused and any(_match(_STOCK_KEY, key, family) for key in tensors)):
        wrapped = PeftModel.from_pretrained(model, str(directory), **kwargs)
    else:
        tensors, config = split(tensors, config, family, widths_from_model(model))
        with tempfile.TemporaryDirectory(prefix="prunetune-adapter-") as tmp:
            write_adapter_files(tmp, tensors, config)
            wrapped = PeftModel.from_pretrained(model, tmp, **kwargs)
    names = wrapped.active_adapters if hasattr(wrapped, "active_adapters") else ["default"]
    have = {key.replace(f".{name}.", ".") for key in wrapped.state_dict() for name in names}
    unplaced = sorted(key for key in tensors if key not in have)
    if unplaced:
        raise UserError(f"the adapter in '{directory}' has {len(unplaced)} weights this model has no place for "
                        f"(e.g. {unplaced[0]}); load it on the model it was trained on")
    return wrapped
