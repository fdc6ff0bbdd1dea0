"""`prunetune export --format hf`: any model prunetune loads, written as the Hugging Face directory stock
transformers and vLLM load, through the same lifecycle as every other output (record, report, card)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..report import is_run_directory, read_record
from .lifecycle import Run
from .settings import RunOptions


def write_hf(model_spec: str, out: Path, dtype: str = "float32", overwrite: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Load `model_spec` (anything load_model accepts: a GGUF file, an older run directory) and write it
    to `out`; returns the record, whose architecture says what it was saved as."""
    run = Run("export", out, RunOptions(dtype=dtype, device="cpu", overwrite=overwrite), model=model_spec,
              accelerate=False, log=log)
    model, tokenizer = run.load(model_spec)
    source = read_record(Path(model_spec)) if is_run_directory(Path(model_spec)) else {}
    carried = {k: source[k] for k in ("source_model", "method") if k in source}  # what the card says it is
    return run.finish(model, tokenizer, source=model_spec, **carried, format="hf", dtype=dtype)
