"""What the benchmarks that run many cells share: one results file that several workers fill at once.

A cell is one measured configuration (a ratio, a method, a seed). Each finished cell is added at once to
the script's results file (under a lock, merged with what other workers wrote meanwhile) and skipped on
the next run, so a table can be completed across sessions; a worker claims the cell it runs, so several
workers (one per core) can share a plan.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
from pathlib import Path


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"cells": {}}


def save_cell(path: Path, key: str, cell: dict, settings: dict) -> None:
    """Add one cell to the results file, merged with what other workers wrote meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        results["settings"] = settings
        results["cells"][key] = cell
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def worker_alive(pid_text: str, script: str) -> bool:
    """Whether the claim's process is a live worker of `script`. A bare pid check is not enough: a pid
    is reused after a reboot (a claim left holding "1" would look alive for ever)."""
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or script.encode() in cmdline.read_bytes()


def claim(runs: Path, key: str, script: str) -> bool:
    """Take a cell for this worker; a claim whose process is gone is stale."""
    claims = runs / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    marker = claims / key.replace("/", "_")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if worker_alive(marker.read_text(), script):
            return False
        marker.unlink(missing_ok=True)
        return claim(runs, key, script)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def release(runs: Path, key: str) -> None:
    (runs / ".claims" / key.replace("/", "_")).unlink(missing_ok=True)


def stat(values: list[float]) -> str:
    """One value as it is; several as mean ± sample standard deviation."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def check_settings(results: dict, settings: dict, path: Path) -> None:
    """A results file holds cells of one set of settings: a run under others needs its own file."""
    if results.get("settings", settings) != settings:
        raise SystemExit(f"{path} holds cells of other settings ({results['settings']}); use another --results")
