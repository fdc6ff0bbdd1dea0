"""Run directories: written to a temporary sibling and renamed when complete; prunetune.json
(what was run, on what, with which settings and results) and a readable report.md."""

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

from . import __version__
from .errors import UserError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work if the output cannot be written."""
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' is a file, not a directory")


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
        **fields,
    }


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")


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


def write_prune_report(path: Path, record: dict) -> None:
    """report.md of a pruning run: settings, parameters and perplexity before/after, kept units."""
    params = record["parameters"]
    lines = [
        f"# prunetune {record['command']}: {record['method']} on {record['source_model']}",
        "",
        f"Created {record['created']} with prunetune {record['prunetune_version']} on {record['device']}; "
        f"saved as `{record['architecture']['saved_as']}`"
        + (" (stock `from_pretrained` loads it)" if record["architecture"]["stock_loadable"]
           else " (layers differ in shape: load with `prunetune.load_model`)") + ".",
        "",
        "## Settings",
        "",
        markdown_table(["setting", "value"], [[k, f"`{v}`"] for k, v in record["settings"].items()]),
        "",
        "## Result",
        "",
        f"Prunable parameters: {record['prunable']}.",
        "",
    ]
    rows = [
        ["parameters (total)", f"{params['before']['total']:,}", f"{params['after']['total']:,}"],
        ["parameters (non-embedding)", f"{params['before']['non_embedding']:,}", f"{params['after']['non_embedding']:,}"],
        ["prunable parameters", f"{params['before']['prunable']:,}", f"{params['after']['prunable']:,}"],
    ]
    results = record.get("results", {})
    if "perplexity_before" in results:
        b, a = results["perplexity_before"], results["perplexity_after"]
        rows.append([f"perplexity ({b['data']}, {b['seq_len']} tokens)", f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}"])
    lines += [markdown_table(["", "before", "after"], rows), ""]
    lines.append(f"Ratio of prunable parameters removed: target {params['ratio_target']:.3f}, "
                 f"achieved {params['ratio_achieved']:.3f}.")
    if "perplexity_before" in results:
        lines += ["", f"Perplexity protocol: {results['perplexity_before']['protocol']}."]
    lines += ["", "## Kept units per layer", ""]
    layer_rows = [[e["layer"], e["num_heads"], e["num_kv_heads"], e["num_channels"]] for e in record["kept"]["layers"]]
    lines += [markdown_table(["layer", "query heads", "kv heads", "MLP channels"], layer_rows), ""]
    path.write_text("\n".join(lines))
