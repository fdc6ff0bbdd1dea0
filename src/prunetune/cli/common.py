"""What the command modules share besides their options (options.py): the console, small helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console

from ..errors import UserError

# Piped output (CI logs, files) gets 120 columns rather than rich's 80, so the wide tables stay whole.
out = Console(width=120) if not sys.stdout.isatty() and "COLUMNS" not in os.environ else Console()


def log(msg: str) -> None:
    out.print(f"[dim]{msg}[/dim]")


def check_json_path(json_path: Optional[Path]) -> None:
    if json_path and not json_path.parent.is_dir():
        raise UserError(f"cannot write --json {json_path}: no directory '{json_path.parent}'")
