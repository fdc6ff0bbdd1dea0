"""The GGUF form: one `.gguf` file that llama.cpp (and Ollama, which runs llama.cpp) loads.

Written with the `gguf` package's GGUFWriter. Which llama.cpp architecture a model becomes
(read from llama.cpp's source, src/llama-model.cpp and src/models/*.cpp):

- Llama and Mistral, every layer one shape -> `llama`. (Mistral's sliding window is dropped, as
  llama.cpp's own converter does: the `llama` graph has none.)
- Qwen2, one shape and heads filling the hidden size -> `qwen2`. Its loader builds q and o as
  hidden x hidden, so a head-pruned Qwen2 cannot be `qwen2` and goes to `deci` like a per-layer one.
- Qwen3, one shape -> `qwen3` (q/k norms). Per-layer Qwen3 is refused: `deci` has no q/k norms.
- Layers of different shapes (Llama, Mistral, Qwen2) -> `deci`, the one graph that builds every
  tensor from per-layer `head_count`, `head_count_kv` and `feed_forward_length` arrays (`llama` uses
  layer 0's values everywhere). Its q/k/v biases are per-layer sized, which is what Qwen2 needs.

`llama` and `deci` rotate pairs of neighbouring values (RoPE "NORM"); transformers rotates the two
halves of a head. So q and k rows (and their biases) are permuted per head as llama.cpp's converter
does, with that layer's query heads for q and its key/value heads for k. `qwen2` and `qwen3` use the
half-rotating "NEOX" RoPE, like transformers, and take the weights as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..layer_shapes import is_uniform, layer_shapes

from . import GGUF_OUTTYPES as OUTTYPES
Q8_0_BLOCK = 32  # a q8_0 row is a whole number of 32-value blocks; other rows are written f16, as llama.cpp does

# The model types this writer knows the llama.cpp graphs of.
WRITTEN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# transformers module names -> gguf.MODEL_TENSOR members, per decoder layer.
_LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM", "post_attention_layernorm": "FFN_NORM",
    "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K", "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT", "self_attn.q_norm": "ATTN_Q_NORM", "self_attn.k_norm": "ATTN_K_NORM",
    "mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_gguf_export(config, out: Path, outtype: str, overwrite: bool) -> str:
    """The llama.cpp architecture `config` will be written as, or a UserError; reads no weights."""
    from ..models import check_architecture
    from ..report.rundir import check_parent_writable

    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype '{outtype}'; use {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"the GGUF output '{out}' must be a file name ending in .gguf")
    if out.is_dir():
        raise UserError(f"'{out}' is a directory; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite or choose another --out")
    check_parent_writable(out)
    check_architecture(config)
    if config.model_type not in WRITTEN_MODEL_TYPES:
        if not is_uniform(config):
            raise UserError(f"llama.cpp builds '{config.model_type}' models with one shape in every layer; prune "
                            "with --layers all, then convert the output with llama.cpp's convert_hf_to_gguf.py")
        raise UserError(f"prunetune writes GGUF for {', '.join(WRITTEN_MODEL_TYPES)} models, not "
                        f"'{config.model_type}'; this output loads in stock transformers and vLLM as it is: convert "
                        "its directory with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"activation '{config.hidden_act}' is not SiLU; llama.cpp's graphs for these models use SiLU")
    shapes, uniform, head_dim = layer_shapes(config), is_uniform(config), _head_dim(config)
    for i, shape in enumerate(shapes):
        if min(shape.values()) == 0:  # llama.cpp's deci reads 0 heads or 0 channels as a different layer kind
            raise UserError(f"layer {i} has no attention heads or no MLP channels left; GGUF cannot hold that "
                            "layer; prune less or remove the layer")
    if head_dim % 2:
        raise UserError(f"head size {head_dim} is odd; RoPE needs an even head size")

    model_type = config.model_type
    if model_type == "qwen3":
        if not uniform:
            raise UserError("llama.cpp has no graph for Qwen3 layers of different shapes (deci has no q/k norms); "
                            "export with --format hf and load it with prunetune.load_model, or prune with --layers all")
        arch = "qwen3"
    elif model_type == "qwen2":
        full_heads = shapes[0]["num_attention_heads"] * head_dim == config.hidden_size
        arch = "qwen2" if uniform and full_heads else "deci"
    else:  # llama, mistral
        arch = "llama" if uniform else "deci"

    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise UserError(f"RoPE scaling '{rope_type}' is not supported by the GGUF export (default and llama3 are); "
                        "export with --format hf instead")
    if rope_type == "llama3" and arch in ("qwen2", "qwen3"):  # their graphs take no RoPE frequency factors
        raise UserError(f"llama.cpp's {arch} graph has no Llama-3 RoPE scaling; export with --format hf instead")
    return arch


def write_gguf(model_spec: str, out: Path, outtype: str = "f32", overwrite: bool = False) -> dict:
    """Load `model_spec` (anything load_model accepts) in fp32 and write it as one GGUF file."""
    from ..models import load_config, load_model, resolve_model_spec
    from .gguf_tokenizer import check_tokenizer_files

    source = resolve_model_spec(model_spec)  # a path that is not a model fails here
    config = load_config(source)
    check_gguf_export(config, out, outtype, overwrite)
    pre = None
    if source.kind == "dir":
        check_tokenizer_files(Path(source.path))
    elif source.kind == "gguf":
        pre = _source_pre_tokenizer(Path(source.path) / source.gguf_file)
    model, tokenizer = load_model(model_spec, dtype="float32", device="cpu")
    return export_gguf(model, tokenizer, out, outtype, overwrite, pre_tokenizer=pre)


def _source_pre_tokenizer(file: Path) -> str:
    """The pre-tokenizer a GGUF source names: its tokenizer is llama.cpp's already."""
    from gguf import GGUFReader

    fields = GGUFReader(file).fields
    model = fields.get("tokenizer.ggml.model")
    if model is None or model.contents() != "gpt2":
        raise UserError(f"'{file}' does not hold a byte-level BPE tokenizer; GGUF export writes only those")
    pre = fields.get("tokenizer.ggml.pre")
    return pre.contents() if pre is not None else "default"


def export_gguf(model: nn.Module, tokenizer, out: Path, outtype: str = "f32", overwrite: bool = False,
                pre_tokenizer: str | None = None) -> dict:
    """Write an in-memory transformers model (LoRA merged and quantization undone first) and its
    tokenizer to `out`. Returns {"path", "architecture", "outtype", "tensors", "bytes", "tokenizer_pre"}."""
    import gguf

    from ..structure.surgery import dequantize, merge_lora, sync_config
    from ..structure.units import Structure
    from ..modeling import unwrap
    from .gguf_tokenizer import add_tokenizer

    model = merge_lora(model)
    dequantize(model)
    hf = unwrap(model)
    sync_config(hf)  # the config describes the modules as they are (per-layer shapes)
    out = Path(out)
    arch = check_gguf_export(hf.config, out, outtype, overwrite)
    structure = Structure.of(hf)

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    made = _make_parents(out.parent)
    writer = gguf.GGUFWriter(partial, arch)
    try:
        _add_hparams(writer, hf.config, structure, arch, outtype, name=out.stem)
        pre = add_tokenizer(writer, tokenizer, structure.vocab, pre_tokenizer)["pre"]
        count = 0
        for name, tensor in _tensors(hf, structure, arch):
            data, raw_dtype = _encode(tensor, outtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        for directory in reversed(made):
            directory.rmdir()
        raise
    return {"path": str(out), "architecture": arch, "outtype": outtype, "tensors": count,
            "bytes": out.stat().st_size, "tokenizer_pre": pre}


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and missing parents; return those created, outermost first (to undo them)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    missing.reverse()
    for path in missing:
        path.mkdir()
    return missing


def _add_hparams(writer, config, structure, arch: str, outtype: str, name: str) -> None:
    import gguf

    shapes = structure.layers
    writer.add_name(name)
    writer.add_context_length(structure.max_positions)
    writer.add_embedding_length(structure.hidden)
    writer.add_block_count(structure.num_layers)
    if arch == "deci":  # per-layer arrays, plain Python ints (GGUFWriter refuses numpy ints)
        writer.add_head_count([int(s.num_heads) for s in shapes])
        writer.add_head_count_kv([int(s.num_kv_heads) for s in shapes])
        writer.add_feed_forward_length([int(s.intermediate) for s in shapes])
    else:
        writer.add_head_count(int(shapes[0].num_heads))
        writer.add_head_count_kv(int(shapes[0].num_kv_heads))
        writer.add_feed_forward_length(int(shapes[0].intermediate))
    # llama.cpp would take hidden / heads of layer 0 as the head size; pruned heads make that wrong.
    writer.add_key_length(structure.head_dim)
    writer.add_value_length(structure.head_dim)
    writer.add_rope_dimension_count(structure.head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(structure.vocab)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(int(file_types[outtype]))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (or their bias) from transformers' half-rotation order to llama.cpp's
    neighbouring pairs, head by head (llama.cpp's convert_hf_to_gguf `permute`)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def rope_unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_permute (for checks)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensors(hf: nn.Module, structure, arch: str):
    """(GGUF name, tensor) for every tensor the file holds."""
    import gguf

    names = gguf.TENSOR_NAMES
    tensor = gguf.MODEL_TENSOR
    yield names[tensor.TOKEN_EMBD] + ".weight", hf.model.embed_tokens.weight
    permute = arch in ("llama", "deci")
    for i, layer in enumerate(hf.model.layers):
        shape = structure.layers[i]
        for module_name, member in _LAYER_TENSORS.items():
            module = _submodule(layer, module_name)
            if module is None:  # q/k norms exist only in Qwen3
                continue
            base = names[getattr(tensor, member)].format(bid=i)
            for kind in ("weight", "bias"):
                value = getattr(module, kind, None)
                if value is None:
                    continue
                if permute and module_name == "self_attn.q_proj":
                    value = rope_permute(value, shape.num_heads)
                elif permute and module_name == "self_attn.k_proj":
                    value = rope_permute(value, shape.num_kv_heads)
                yield f"{base}.{kind}", value
    yield names[tensor.OUTPUT_NORM] + ".weight", hf.model.norm.weight
    if not structure.tied_embeddings:  # tied: llama.cpp reuses token_embd when output.weight is absent
        yield names[tensor.OUTPUT] + ".weight", hf.lm_head.weight
    factors = _llama3_rope_factors(hf, structure)
    if factors is not None:
        yield names[tensor.ROPE_FREQS] + ".weight", factors


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _llama3_rope_factors(hf: nn.Module, structure) -> torch.Tensor | None:
    """Llama 3 RoPE scaling as llama.cpp holds it: one divisor per frequency (`rope_freqs.weight`),
    here the plain frequencies over the scaled ones transformers computes with."""
    rope = getattr(hf.config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    dim = structure.head_dim
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return plain / hf.model.rotary_emb.inv_freq.detach().float().cpu()


def _encode(tensor: torch.Tensor, outtype: str):
    """(numpy data, raw GGML type or None) for one tensor: 1-D tensors (norms, biases, RoPE factors)
    stay f32 at every outtype, as llama.cpp's converter keeps them."""
    from gguf import GGMLQuantizationType, quants

    data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, None
    if outtype == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None
