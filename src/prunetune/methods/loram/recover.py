"""Move a LoRA adapter trained on a pruned model to the full model's shapes (LoRAM recovery).

LoRAM (Zhang, Wang et al., ICLR 2025) trains the LoRA on a structurally pruned model and serves it on
the full one. Pruning removed output rows of q, k, v, gate and up (query heads, key/value heads, MLP
channels) and the matching input columns of o and down. Recovery writes the trained B rows of q, k,
v, gate, up, and the trained A columns of o, down, back at their original positions in zero matrices
of the full shape, and copies the other matrix as it is (the hidden size is not pruned). So B_R·A_R
is the trained update on kept rows and columns and exactly zero on pruned ones, and the full model
with the recovered adapter and the pruned units masked computes what the pruned model with its
adapter computed.

Adapters are read and written as PEFT saves them: adapter_config.json and adapter_model.safetensors
with keys like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (no adapter name). A fused
family's adapter (Phi-3's `qkv_proj`) is split into its projections for recovery and joined again after
(families/adapters.py), so the recovered adapter is in the layout stock PEFT reads on the stock model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ...families.adapters import (CONFIG_FILE, WEIGHTS_FILE, fused_family, join, load_peft, read_adapter_files,
                                  split, widths_from_shapes, write_adapter_files)
from ...layer_shapes import LAYER_SHAPES_KEY
from ...structure.units import LayerShape, Structure

# Projection -> the kept-summary field that says which of its rows (B) or columns (A) survived.
ROWS_PRUNED = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads",
               "gate_proj": "channels", "up_proj": "channels"}
COLUMNS_PRUNED = {"o_proj": "heads", "down_proj": "channels"}
# (a fused family's projections sit one level deeper, e.g. Phi-3's self_attn.qkv_proj.q_proj)
_KEY = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(?:\w+\.)?(\w+)\.(lora_A|lora_B)\.(weight|bias)$")


@dataclass(frozen=True)
class FullShapes:
    """What recovery needs to know of the full model. `head_dim` None: read it off the adapter."""

    layers: tuple[LayerShape, ...]
    hidden: int
    head_dim: int | None = None

    @classmethod
    def of(cls, full) -> "FullShapes":
        """From a FullShapes, a Structure, a model, or a transformers config of the full model."""
        if isinstance(full, FullShapes):
            return full
        if isinstance(full, nn.Module):
            full = Structure.of(full)
        if isinstance(full, Structure):
            return cls(full.layers, full.hidden, full.head_dim)
        heads = full.num_attention_heads  # a config; per-layer shapes where prunetune recorded them
        shapes = getattr(full, LAYER_SHAPES_KEY, None) or [{
            "num_attention_heads": heads, "num_key_value_heads": getattr(full, "num_key_value_heads", None) or heads,
            "intermediate_size": full.intermediate_size}] * full.num_hidden_layers
        layers = tuple(LayerShape(s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"])
                       for s in shapes)
        return cls(layers, full.hidden_size, getattr(full, "head_dim", None) or full.hidden_size // heads)


@dataclass(frozen=True)
class PrunedRun:
    kept: dict  # Masks.kept_summary of the source model
    full: FullShapes
    source_model: str | None


def read_pruned_run(run_dir: str | Path) -> PrunedRun:
    """The kept units and source shapes recorded in a structured-pruning run directory's prunetune.json."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / "prunetune.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"'{run_dir}' has no readable prunetune.json; pass the output directory of "
                        "`prunetune prune` or `prunetune loram prune`") from None
    arch = record.get("architecture", {})
    if "kept" not in record or "source_layer_shapes" not in arch or "source_hidden" not in arch:
        raise UserError(f"'{run_dir}' is not a structured-pruning output of prunetune (its prunetune.json records no "
                        "kept units); recover unstructured or 2:4 adapters with recover_identity")
    head_dim = None
    if (run_dir / "config.json").is_file():  # a pruned or aligned model: its head size is the source's
        head_dim = json.loads((run_dir / "config.json").read_text()).get("head_dim")
    layers = tuple(LayerShape(**s) for s in arch["source_layer_shapes"])
    return PrunedRun(record["kept"], FullShapes(layers, arch["source_hidden"], head_dim), record.get("source_model"))


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter config) of a PEFT LoRA adapter directory."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_FILE).is_file() or not (adapter_dir / WEIGHTS_FILE).is_file():
        raise UserError(f"'{adapter_dir}' is not a PEFT adapter directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise UserError(f"'{adapter_dir}' holds a {'DoRA' if config.get('use_dora') else config.get('peft_type')} "
                        "adapter; recovery moves plain LoRA adapters only")
    return read_adapter_files(adapter_dir)[0], config


def check_recoverable(kept: dict, full: FullShapes) -> None:
    """LoRAM recovery puts back heads and MLP channels; removed layers or hidden channels it cannot."""
    if len(kept["layers"]) < len(full.layers) or kept["num_hidden"] < full.hidden:
        what = "layers were removed" if len(kept["layers"]) < len(full.layers) else "hidden channels were pruned"
        raise UserError(f"LoRAM recovery supports head and MLP-channel pruning only, but {what}; "
                        "recover from a run that pruned heads and MLP channels (PruneSettings.units heads,channels)")
    if [entry["layer"] for entry in kept["layers"]] != list(range(len(full.layers))):
        raise UserError(f"the kept summary lists layers {[e['layer'] for e in kept['layers']]}, "
                        f"but the full model has {len(full.layers)}; it belongs to another model")


def _unit_counts(shape: LayerShape) -> dict[str, int]:
    return {"heads": shape.num_heads, "kv_heads": shape.num_kv_heads, "channels": shape.intermediate}


def _pruned_dim(name: str, matrix: str) -> tuple[str, int] | None:
    """(kept-summary field, dimension) of the matrix whose rows or columns pruning removed."""
    if matrix == "lora_B" and name in ROWS_PRUNED:
        return ROWS_PRUNED[name], 0
    if matrix == "lora_A" and name in COLUMNS_PRUNED:
        return COLUMNS_PRUNED[name], 1
    return None


def _infer_head_dim(tensors: dict[str, torch.Tensor], kept: dict) -> int | None:
    """The head size, from the first adapter matrix whose pruned dimension counts heads."""
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        pruned = match and match[4] == "weight" and _pruned_dim(match[2], match[3])
        if not pruned or pruned[0] == "channels" or int(match[1]) >= len(kept["layers"]):
            continue
        field, dim = pruned
        heads = len(kept["layers"][int(match[1])][field])
        if tensor.shape[dim] % heads:
            raise UserError(f"adapter tensor {key} has {tensor.shape[dim]} rows/columns for {heads} kept heads; "
                            "it was not trained on the model this kept summary describes")
        return tensor.shape[dim] // heads
    return None


def _full_linear_shape(name: str, shape: LayerShape, head_dim: int | None, hidden: int) -> tuple[int, int]:
    """(out, in) of a projection in the full model."""
    if name in ("gate_proj", "up_proj", "down_proj"):
        units = shape.intermediate
    else:
        units = (shape.num_kv_heads if name in ("k_proj", "v_proj") else shape.num_heads) * head_dim
    return (hidden, units) if name in COLUMNS_PRUNED else (units, hidden)


def recover_tensors(tensors: dict[str, torch.Tensor], kept: dict, full) -> dict[str, torch.Tensor]:
    """The adapter's tensors at the full model's shapes: kept rows of B / columns of A go back to their
    positions, pruned ones are zero; every other tensor is copied."""
    full = FullShapes.of(full)
    check_recoverable(kept, full)
    head_dim = full.head_dim or _infer_head_dim(tensors, kept)
    out = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or match[2] not in ROWS_PRUNED | COLUMNS_PRUNED:
            out[key] = tensor  # e.g. an adapter on lm_head: the hidden size is not pruned
            continue
        layer, name, matrix, kind = int(match[1]), match[2], match[3], match[4]
        if layer >= len(full.layers):
            raise UserError(f"adapter tensor {key} is in layer {layer}; the full model has {len(full.layers)} layers")
        entry, shape = kept["layers"][layer], full.layers[layer]
        pruned = _pruned_dim(name, matrix)
        if pruned is not None:
            field, dim = pruned
            unit = 1 if field == "channels" else head_dim
            count = _unit_counts(shape)[field]
            kept_units = torch.tensor(entry[field], dtype=torch.long)
            positions = (kept_units.unsqueeze(1) * unit + torch.arange(unit)).flatten()  # unit i -> its rows
            if tensor.shape[dim] != len(positions) or max(entry[field], default=-1) >= count:
                raise UserError(f"adapter tensor {key} has {tensor.shape[dim]} {'rows' if dim == 0 else 'columns'} but "
                                f"the kept summary keeps {len(positions)}; it was not trained on this pruned model")
            size = list(tensor.shape)
            size[dim] = count * unit
            tensor = tensor.new_zeros(size).index_copy_(dim, positions, tensor)
        if kind == "weight":
            out_features, in_features = _full_linear_shape(name, shape, head_dim, full.hidden)
            want, got = (out_features, tensor.shape[0]) if matrix == "lora_B" else (in_features, tensor.shape[1])
            if got != want:
                raise UserError(f"adapter tensor {key} has shape {tuple(tensor.shape)} where the full model needs "
                                f"{want} {'rows' if matrix == 'lora_B' else 'columns'}; it belongs to another model")
        out[key] = tensor
    return out


def recover_tensors_and_config(tensors: dict[str, torch.Tensor], config: dict, kept: dict, full
                               ) -> tuple[dict[str, torch.Tensor], dict]:
    """recover_tensors for an adapter of any family, with its config: a fused family's adapter (Phi-3's
    `qkv_proj`, in stock PEFT's layout) is split at the pruned model's widths, recovered projection by
    projection, and joined again at the full model's widths."""
    family = fused_family(tensors)
    if family is None:
        return recover_tensors(tensors, kept, full), config
    full = FullShapes.of(full)
    check_recoverable(kept, full)
    head_dim = full.head_dim or _infer_head_dim(tensors, kept) or _fused_head_dim(tensors, kept, family)
    pruned = [LayerShape(len(e["heads"]), len(e["kv_heads"]), len(e["channels"])) for e in kept["layers"]]
    tensors, config = split(tensors, config, family, widths_from_shapes(pruned, head_dim))
    recovered = recover_tensors(tensors, kept, FullShapes(full.layers, full.hidden, head_dim))
    return join(recovered, config, family, widths_from_shapes(full.layers, head_dim))


def _fused_head_dim(tensors: dict[str, torch.Tensor], kept: dict, family) -> int | None:
    """The head size, from a fused attention projection's B (its rows are every kept head's, q, k and v)."""
    for key, tensor in tensors.items():
        match = re.search(r"\.layers\.(\d+)\.(.+)\.lora_B\.weight$", key)
        if match and "q_proj" in family.fused.get(match[2], ()) and int(match[1]) < len(kept["layers"]):
            entry = kept["layers"][int(match[1])]
            units = sum(len(entry["heads"] if p == "q_proj" else entry["kv_heads"]) for p in family.fused[match[2]])
            return tensor.shape[0] // units
    return None


def recover_adapter(pruned_adapter_dir: str | Path, kept: dict, full, out_dir: str | Path,
                    base_model_name_or_path: str) -> Path:
    """Write the adapter trained on a pruned model as a PEFT adapter of the full model into `out_dir`.

    `kept` is the source model's Masks.kept_summary (prunetune.json's "kept"); `full` describes the full
    model (FullShapes, Structure, model or config; see read_pruned_run). Same r, alpha and targets; the
    result loads with `PeftModel.from_pretrained(full_model, out_dir)`. Nothing is written when the
    adapter does not fit (`loram recover` writes into a run directory, which makes it atomic).
    """
    tensors, config = recover_tensors_and_config(*read_adapter(pruned_adapter_dir), kept, full)
    write_adapter_files(out_dir, tensors, config | {"base_model_name_or_path": base_model_name_or_path})
    return Path(out_dir)


def recover_identity(pruned_adapter_dir: str | Path, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Recovery after unstructured or 2:4 pruning: the weights kept their shapes, so the adapter already
    fits the full model and is re-targeted at it unchanged (new base_model_name_or_path).

    What this means: the update was trained with the pruned weights at zero; on the full model those
    weights come back, so the adapted full model is W + s·B·A with the original W, not the pruned one
    (LoRAM's bet is that an update learned on the sparse model still transfers to the dense one).
    """
    tensors, config = read_adapter(pruned_adapter_dir)
    write_adapter_files(out_dir, tensors, config | {"base_model_name_or_path": base_model_name_or_path})
    return Path(out_dir)


def merge_into(full_model: nn.Module, recovered_adapter_dir: str | Path) -> nn.Module:
    """The full model with the recovered adapter folded into its weights (W + s·B_R·A_R), via PEFT."""
    return load_peft(full_model, recovered_adapter_dir).merge_and_unload()
