"""The target architecture of targeted structured pruning (Sheared-LLaMA), and its parameter count.

Sheared-LLaMA prunes a model down to the shape of an existing smaller model: fewer layers, a
narrower residual stream, fewer heads and MLP channels, the same head_dim and vocabulary. A
target is written either as `key=value` pairs (`layers=24,hidden=2560,heads=20`; a missing key
keeps the source's value) or as the path of a `config.json` (or of a model directory holding one).

A config.json that lists a shape per layer (`prunetune_layer_shapes`, as prunetune writes for a model
pruned layer by layer, LoRAPrune's result for one) is a per-layer target: every layer and the residual
width stay, and each layer keeps its own heads and MLP channels. Sheared-LLaMA's targets are uniform;
this lets its masks aim at the shape another method reached, to compare the two at one shape.

The parameter count is written once, as polynomials in the unit counts (`layer_parameters`,
`outer_parameters`), so that the exact count of a target and the expected count of a set of learned
masks (prunetune.methods.sheared.l0_masks) come from the same formula and cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...families import BY_MODEL_TYPE
from ...layer_shapes import LAYER_SHAPES_KEY
from ...structure.units import Structure, family_fields

KEYS = ("layers", "hidden", "heads", "kv-heads", "intermediate")


@dataclass(frozen=True)
class Target:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    # "kv-group": whole key/value groups are pruned with their query heads;
    # "q-head": every kv head is kept and equal numbers of query heads are pruned inside every group.
    head_unit: str
    # A per-layer target: each layer's (heads, kv-heads, intermediate); `heads`, `kv_heads` and
    # `intermediate` then hold the widest layer's. None: every layer has the one shape above.
    per_layer: tuple[tuple[int, int, int], ...] | None = None

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """(heads, kv-heads, intermediate) of each layer of the pruned model."""
        return list(self.per_layer or [(self.heads, self.kv_heads, self.intermediate)] * self.layers)

    def describe(self) -> str:
        if self.per_layer is None:
            return (f"layers={self.layers},hidden={self.hidden},heads={self.heads},"
                    f"kv-heads={self.kv_heads},intermediate={self.intermediate}")
        runs: list[list] = []  # consecutive layers of one shape, as [count, shape]
        for shape in self.per_layer:
            if runs and runs[-1][1] == shape:
                runs[-1][0] += 1
            else:
                runs.append([1, shape])
        return f"hidden={self.hidden}, per layer: " + "; ".join(
            f"{count} x heads={h},kv-heads={kv},intermediate={i}" for count, (h, kv, i) in runs)


def parse_target(spec: str, source: Structure) -> Target:
    """Read a target from `key=value` pairs or a config.json path and check it against `source`."""
    if not source.uniform:
        raise UserError("targeted pruning needs a source whose layers all have the same shape; "
                        "start from the unpruned model")
    values = _read_spec(spec, source)
    if "per_layer" in values:
        return _validate_per_layer(values, source)
    return _validate(values, source)


def quick_source(model_spec: str) -> Structure | None:
    """A GGUF source's unit counts from its file header alone, enough for `parse_target`'s checks: its
    config through transformers takes seconds (the whole vocabulary is parsed), so a target the source
    cannot have would otherwise fail several times slower than any other mistake. None for other
    sources, whose config.json reads at once, and for a header this does not understand."""
    from ...models import SUPPORTED_ARCHITECTURES, gguf_scalars, resolve_model_spec
    from ...structure.units import LayerShape

    source = resolve_model_spec(model_spec)
    if source.kind != "gguf":
        return None
    meta = gguf_scalars(Path(source.path) / source.gguf_file) or {}
    arch = meta.get("general.architecture")
    names = {"layers": "block_count", "hidden": "embedding_length", "heads": "attention.head_count",
             "intermediate": "feed_forward_length"}
    counts = {key: meta.get(f"{arch}.{name}") for key, name in names.items()}
    # absent: as many kv heads as heads (llama.cpp's default); None: one per layer (an array)
    counts["kv-heads"] = meta.get(f"{arch}.attention.head_count_kv", counts["heads"])
    if arch not in SUPPORTED_ARCHITECTURES or not all(isinstance(v, int) and v > 0 for v in counts.values()):
        return None
    head_dim = meta.get(f"{arch}.attention.key_length") or counts["hidden"] // counts["heads"]
    shape = LayerShape(counts["heads"], counts["kv-heads"], counts["intermediate"])
    return Structure(model_type=arch, hidden=counts["hidden"], head_dim=int(head_dim),
                     vocab=int(meta.get(f"{arch}.vocab_size") or 0), tied_embeddings=False,
                     max_positions=int(meta.get(f"{arch}.context_length") or 0), layers=(shape,) * counts["layers"],
                     qkv_bias=False, o_bias=False, mlp_bias=False, **family_fields(BY_MODEL_TYPE[arch]))


def _source_values(source: Structure) -> dict[str, int]:
    shape = source.layers[0]
    return {"layers": source.num_layers, "hidden": source.hidden, "heads": shape.num_heads,
            "kv-heads": shape.num_kv_heads, "intermediate": shape.intermediate}


def _read_spec(spec: str, source: Structure) -> dict[str, int]:
    path = Path(spec)
    if path.exists():
        return _read_config(path, source)
    if "=" not in spec:
        raise UserError(f"target '{spec}' is neither key=value pairs nor an existing path; "
                        f"write e.g. 'layers=24,hidden=2560' (keys: {', '.join(KEYS)}) or give a config.json")
    values = _source_values(source)
    given: set[str] = set()
    for item in spec.split(","):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep:
            raise UserError(f"target item '{item.strip()}' is not key=value; separate pairs with commas")
        if key not in KEYS:
            raise UserError(f"unknown target key '{key}'; use {', '.join(KEYS)}")
        if key in given:
            raise UserError(f"target key '{key}' is given twice; give it once")
        given.add(key)
        values[key] = _positive_int(key, raw)
    return values


def _positive_int(key: str, raw) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = 0
    if value < 1 or str(raw).strip().lstrip("+") != str(value):
        raise UserError(f"target {key}='{raw}' is not a positive integer; give a whole number of at least 1")
    return value


def _read_config(path: Path, source: Structure) -> dict[str, int]:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"'{path}' holds no config.json; give the directory of a model or its config.json")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read '{file}' as JSON ({error}); give a model's config.json") from None
    fields = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
              "intermediate": "intermediate_size"}
    missing = [name for name in fields.values() if name not in config]
    if missing:
        raise UserError(f"'{file}' lacks {', '.join(missing)}; give a decoder model's config.json or key=value pairs")
    values = {key: _positive_int(key, config[name]) for key, name in fields.items()}
    values["kv-heads"] = _positive_int("kv-heads", config.get("num_key_value_heads") or values["heads"])
    head_dim = config.get("head_dim") or values["hidden"] // values["heads"]
    if head_dim != source.head_dim:
        raise UserError(f"'{file}' has head_dim {head_dim} but the source has {source.head_dim}; pruning keeps "
                        "head_dim, so give the target as key=value pairs instead")
    shapes = config.get(LAYER_SHAPES_KEY)
    if shapes:
        if not len(shapes) == values["layers"] == source.num_layers or values["hidden"] != source.hidden:
            raise UserError(f"'{file}' lists a shape per layer; such a target keeps every layer and the residual "
                            f"width, but it has {len(shapes)} layer shapes, {values['layers']} layers and hidden "
                            f"{values['hidden']} where the source has {source.num_layers} and {source.hidden}")
        try:
            values["per_layer"] = [tuple(_positive_int(key, shape[name]) for key, name in
                                         (("heads", "num_attention_heads"), ("kv-heads", "num_key_value_heads"),
                                          ("intermediate", "intermediate_size"))) for shape in shapes]
        except (KeyError, TypeError):
            raise UserError(f"'{file}' has a {LAYER_SHAPES_KEY} entry without num_attention_heads, "
                            "num_key_value_heads and intermediate_size") from None
    return values


def _validate(values: dict[str, int], source: Structure) -> Target:
    src = _source_values(source)
    for key in KEYS:
        if values[key] > src[key]:
            raise UserError(f"target {key}={values[key]} is larger than the source's {src[key]}; "
                            "a target can only shrink the model")
    if values == src:
        raise UserError(f"the target is the source's own shape ({_describe(src)}); make at least one size smaller")
    heads, kv = values["heads"], values["kv-heads"]
    if heads % kv:
        raise UserError(f"target heads={heads} is not a multiple of kv-heads={kv}; "
                        "choose heads divisible by kv-heads")
    group = src["heads"] // src["kv-heads"]
    if kv < src["kv-heads"]:
        if heads != kv * group:
            raise UserError(
                f"pruning key/value groups removes their {group} query heads with them, so kv-heads={kv} "
                f"needs heads={kv * group}, not {heads}; or keep kv-heads={src['kv-heads']} "
                "and prune query heads inside every group")
        unit = "kv-group"
    else:
        unit = "q-head"
    return Target(layers=values["layers"], hidden=values["hidden"], heads=heads, kv_heads=kv,
                  intermediate=values["intermediate"], head_unit=unit)


def _validate_per_layer(values: dict, source: Structure) -> Target:
    """A per-layer target: each layer's heads checked as a uniform target's are, one head unit for all."""
    units, whole = set(), 0
    for i, (heads, kv, intermediate) in enumerate(values["per_layer"]):
        layer = {"layers": source.num_layers, "hidden": source.hidden, "heads": heads, "kv-heads": kv,
                 "intermediate": intermediate}
        if layer == _source_values(source):
            whole += 1  # a layer left whole
            continue
        try:
            unit = _validate(layer, source).head_unit
        except UserError as error:
            raise UserError(f"layer {i}: {error}") from None
        if heads < source.layers[0].num_heads:  # a layer that keeps every head gates none
            units.add(unit)
    if whole == source.num_layers:
        raise UserError("the target is the source's own shape; make at least one layer smaller")
    if len(units) > 1:
        raise UserError("the target removes key/value groups in some layers and query heads inside groups in "
                        "others; Sheared-LLaMA's head masks do one or the other, so give every layer one kind")
    per_layer = tuple(values["per_layer"])
    return Target(layers=source.num_layers, hidden=source.hidden, heads=max(s[0] for s in per_layer),
                  kv_heads=max(s[1] for s in per_layer), intermediate=max(s[2] for s in per_layer),
                  head_unit=units.pop() if units else "q-head", per_layer=per_layer)


def _describe(values: dict[str, int]) -> str:
    return ",".join(f"{key}={values[key]}" for key in KEYS)


def layer_parameters(source: Structure, hidden, heads, kv_heads, intermediate):
    """Parameters of one decoder layer of the source's kind at the given widths.

    Bilinear in the unit counts and `hidden`, so it also gives the expected count when the
    arguments are expected counts of independent masks (plain numbers or tensors).
    """
    hd = source.head_dim
    qkv_bias, o_bias, mlp_bias = int(source.qkv_bias), int(source.o_bias), int(source.mlp_bias)
    attention = (heads * hd * (hidden + qkv_bias)             # q_proj
                 + 2 * kv_heads * hd * (hidden + qkv_bias)    # k_proj, v_proj
                 + hidden * heads * hd + o_bias * hidden)      # o_proj
    mlp = 3 * intermediate * hidden + mlp_bias * (2 * intermediate + hidden)
    norms = (source.residual_norms * hidden + source.head_dim_norms * hd
             + int(source.head_norms) * (heads + kv_heads) * hd)  # OLMo 2: q/k norms as wide as q and k
    return attention + mlp + norms


def outer_parameters(source: Structure, hidden):
    """Parameters outside the decoder layers: embeddings, final norm, and lm_head when untied."""
    embeddings = source.vocab * hidden
    return embeddings * (1 if source.tied_embeddings else 2) + hidden


def target_parameters(target: Target, source: Structure) -> int:
    """Exact parameter count of a model of the target's shape (vocab, biases, head_dim as the source)."""
    layers = sum(layer_parameters(source, target.hidden, heads, kv, intermediate)
                 for heads, kv, intermediate in target.layer_shapes())
    return int(outer_parameters(source, target.hidden) + layers)
