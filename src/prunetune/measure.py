"""What the benchmarks share: memory measures, freeing memory, running one measurement in a fresh
process, and describing the machine.

On the CPU a benchmark runs each of its measurements in its own Python process
(`run_isolated`), so the peak resident set it reports is that measurement's own: the worker
resets the peak (Linux VmHWM, through /proc/self/clear_refs) once its model is built and reports
peak minus the resident size before building. glibc's mmap threshold is fixed in the worker so
freed tensors leave the resident set instead of staying in the heap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from .errors import UserError

GIB = 1024 ** 3
MIB = 1024 ** 2
MMAP_THRESHOLD = 65536  # bytes; see run_isolated


# ---------------------------------------------------------------------------------------------
# Memory


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        malloc_trim()


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the resident size counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Make VmHWM equal to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def peak_rss_bytes() -> int:
    hwm = _proc_status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    rss = _proc_status_kib("VmRSS")
    return rss * 1024 if rss is not None else 0


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (each storage once; tied weights count once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# One measurement in a fresh process


def run_isolated(module: str, payload: dict, what: str) -> dict:
    """Run `python -m module --payload JSON --result FILE` (a `worker_main`) and return its record.

    A UserError inside the worker comes back as a UserError; anything else as a RuntimeError with
    the tail of the worker's stderr.
    """
    with tempfile.TemporaryDirectory(prefix="prunetune-bench-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        # A fixed glibc mmap threshold (no dynamic raise) sends every freed tensor above 64 KiB back to
        # the OS, so the resident size follows live memory instead of heap fragmentation (measured on
        # the SmolLM2 shape: LoRA's many small temporaries otherwise added ~250 MiB of freed heap).
        # It costs CPU time (~30% of a training step there), alike for every measurement.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
        done = subprocess.run([sys.executable, "-m", module, "--payload", json.dumps(payload),
                               "--result", result_path], capture_output=True, text=True, env=env)
        record = None
        if os.path.exists(result_path):
            with open(result_path) as f:
                record = json.load(f)
    if record is not None and "error" in record:
        raise UserError(record["error"])
    if done.returncode != 0 or record is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"the benchmark process for {what} exited with code {done.returncode}:\n{tail}")
    return record


def isolation_note(what: str) -> str:
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    return f"each {what} in a fresh process, MALLOC_MMAP_THRESHOLD_={threshold}"


def worker_main(run: Callable[[dict], dict], argv: list[str] | None = None, description: str = "") -> int:
    """The worker side of `run_isolated`: `run(payload)` returns a JSON-able record."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--payload", required=True, help="what to measure, as JSON")
    parser.add_argument("--result", required=True, help="where to write the record as JSON")
    args = parser.parse_args(argv)
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        record, code = run(json.loads(args.payload)), 0
    except UserError as exc:
        record, code = {"error": str(exc)}, 2
    with open(args.result, "w") as f:
        json.dump(record, f)
    return code


# ---------------------------------------------------------------------------------------------
# The machine


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
