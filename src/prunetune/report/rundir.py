"""Run directories: written to a temporary sibling and renamed when complete, with prunetune.json
(what was run, on what, with which settings and results)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError


# Everything in a run directory that no serving engine reads (unit scores, plots) goes in this
# subfolder: vLLM loads every *.safetensors file at the top of a model directory, so the top holds
# only the model, its config and tokenizer files, prunetune.json and report.md.
EXTRAS_DIR = "run"


def extra_file(run_dir: Path, name: str) -> Path:
    """Where a run keeps `name` (a file or folder no engine reads): DIR/run/NAME. Runs made before that
    folder existed kept it at the top level; for them this finds it there."""
    new, old = Path(run_dir) / EXTRAS_DIR / name, Path(run_dir) / name
    return old if old.exists() and not new.exists() else new


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work if the output cannot be written: it exists (without --overwrite) or is a
    file, or the directory it would be made in is a file or not writable."""
    out = Path(out)
    # os.path rather than Path: Path.exists() raises where a parent is unreadable; os.path says False.
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"'{out}' is a file, not a directory; choose another --out")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite or choose another --out")
    check_parent_writable(out)


def check_parent_writable(out: Path, flag: str = "--out") -> None:
    """Fail if `out` (a file or directory, written through a temporary sibling) cannot be made: the
    nearest of its parents that exists is a file, or not writable."""
    ancestor = next(p for p in Path(out).absolute().parents if os.path.lexists(p))
    if not os.path.isdir(ancestor):
        raise UserError(f"cannot create '{out}': '{ancestor}' is a file, not a directory; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create '{out}': no permission to write in '{ancestor}' (or it is read-only); "
                        f"choose another {flag}")


@contextmanager
def run_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out`, on failure it goes."""
    out = Path(out)
    check_output_dir(out, overwrite)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # nearest first; only the ones this run made, and only if empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def provenance(command: str, **fields) -> dict:
    """The common head of every prunetune.json."""
    return {
        "prunetune_version": __version__,
        "command": command,
        "argv": sys.argv[1:],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "environment": environment(),
        **fields,
    }


def environment() -> dict:
    """What a run's bits depend on besides its settings. Two runs of one command agree bit for bit
    on one machine; on a CPU with other vector instructions (AVX2 against AVX-512) or under other
    library versions the rounding differs, and pruning's near-tied scores can turn that into other
    kept units (measured: forcing AVX2 swapped 1% of the kept channels of a 50% LoRAPrune run)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "packages": {name: installed(name) for name in ("transformers", "peft", "accelerate", "bitsandbytes")},
    }


def write_json(path: Path, record: dict) -> None:
    replace_file(Path(path), json.dumps(record, indent=2, default=_json_default) + "\n")


def replace_file(path: Path, text: str) -> None:
    """Write text to a temporary sibling and rename it over `path`: readers never see half a file."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
