"""What the command modules share: the console, help texts, small option helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console

from ..errors import UserError

# Piped output (CI logs, files) gets 120 columns rather than rich's 80, so the wide tables stay whole.
out = Console(width=120) if not sys.stdout.isatty() and "COLUMNS" not in os.environ else Console()

MODEL_HELP = "Hub id, local model directory, .gguf file, or the built-in 'smollm2-135m'."
DTYPE_HELP = "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."
QUANT_HELP = "Load the frozen base quantized with bitsandbytes: 8bit or nf4."


def log(msg: str) -> None:
    out.print(f"[dim]{msg}[/dim]")


def training_options(steps: int, batch_size: int, grad_accum: int, seq_len: int, lr: float,
                      gradient_checkpointing: bool, checkpoint_every: int, seed: int):
    from ..training.loop import TrainSettings

    return TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                         gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every, seed=seed)


def check_json_path(json_path: Optional[Path]) -> None:
    if json_path and not json_path.parent.is_dir():
        raise UserError(f"cannot write --json {json_path}: no directory '{json_path.parent}'")


