"""`prunetune export`, and the `--export` option that prune, shear, train and `loram recover --merge`
share: write a model in the form a serving engine loads (GGUF for llama.cpp/Ollama, the Hugging
Face directory for transformers and vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..export import GGUF_FILE, GGUF_OUTTYPES
from . import options
from .common import log, out

commands = typer.Typer()

FORMATS = ("gguf", "hf")
HF_OUTTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

EXPORT_HELP = ("Also write the result for llama.cpp/Ollama when the run ends: gguf (f32) or gguf:f16, "
               f"gguf:q8_0; the file is DIR/{GGUF_FILE}.")
ExportOption = Annotated[Optional[str], typer.Option("--export", help=EXPORT_HELP, show_default=False)]


def parse_export(value: str | None) -> str | None:
    """The GGUF outtype `--export gguf[:OUTTYPE]` asks for (None: no export), checked before any work."""
    if value is None:
        return None
    fmt, _, outtype = value.partition(":")
    if fmt != "gguf":
        raise UserError(f"--export takes gguf or gguf:OUTTYPE, not '{value}' (the run directory is the Hugging Face "
                        "form already)")
    outtype = outtype or "f32"
    if outtype not in GGUF_OUTTYPES:
        raise UserError(f"unknown GGUF outtype '{outtype}' in --export; use {', '.join(GGUF_OUTTYPES)}")
    return outtype


def check_export_shape(outtype: str | None, model_spec: str, per_layer: bool) -> None:
    """Refuse before the run what GGUF cannot hold: a model that will have layers of different
    shapes, where llama.cpp has no graph for its architecture (Qwen3's q/k norms)."""
    if outtype is None:
        return
    from ..models import load_config, resolve_model_spec

    config = load_config(resolve_model_spec(model_spec))
    if per_layer and config.model_type == "qwen3":
        raise UserError("--export gguf cannot hold a Qwen3 model whose layers have different shapes (llama.cpp's "
                        "per-layer graph, deci, has no q/k norms); prune with --layers all, or drop --export and "
                        "serve the run directory with prunetune.load_model or vLLM and prunetune's plugin")


@commands.command("export", epilog="Examples:\n\n"
             "prunetune export runs/lp20 --format gguf --outtype f16 --out lp20.gguf   (llama.cpp, Ollama)\n\n"
             "prunetune export smollm2-135m --format hf --out runs/smollm2-hf   (transformers, vLLM)")
def export_command(
    model: Annotated[str, typer.Argument(help="A prunetune run directory, any Hugging Face model directory or "
                                         "hub id, a .gguf file, or the built-in 'smollm2-135m'.")],
    out_path: Annotated[Path, typer.Option("--out", help="The .gguf file (gguf) or directory (hf) to write; "
                                           "written beside and renamed when complete.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, Ollama) or hf (transformers, vLLM).")] = "gguf",
    outtype: Annotated[str, typer.Option(help="Weight type: gguf: f32, f16 or q8_0; hf: f32, f16 or bf16.")] = "f32",
    overwrite: bool = options.overwrite(),
) -> None:
    """Write a model in the form a serving engine loads."""
    if fmt == "gguf":
        if outtype not in GGUF_OUTTYPES:
            raise UserError(f"unknown --outtype '{outtype}' for gguf; use {', '.join(GGUF_OUTTYPES)}")
        from ..export.gguf import write_gguf

        summary = write_gguf(model, out_path, outtype, overwrite)
        out.print(f"wrote {out_path} ({summary['architecture']}, {outtype}, {summary['tensors']} tensors, "
                  f"{summary['bytes'] / 2**20:.0f} MiB); run it with llama.cpp: llama-cli -m {out_path}")
    elif fmt == "hf":
        if outtype not in HF_OUTTYPES:
            raise UserError(f"unknown --outtype '{outtype}' for hf; use {', '.join(HF_OUTTYPES)}")
        from ..runs.convert import write_hf

        saved_as = write_hf(model, out_path, HF_OUTTYPES[outtype], overwrite, log=log)["architecture"]["saved_as"]
        out.print(f"wrote {out_path} ({saved_as}, {outtype})")
    else:
        raise UserError(f"unknown --format '{fmt}'; use {' or '.join(FORMATS)}")
