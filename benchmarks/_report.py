"""The benchmarks' results pages: what every script's `--report` shares.

A benchmark script writes one small summary per cell to `benchmarks/results/` (per-step histories stay
in the run directories), and its `--report` turns that committed file, and nothing else, into
`docs/results/<script>.md`: each table preceded by the command that produced its numbers, the machine
and the date. Pages hold no generation time, so the same results give a byte-identical page
(tests/test_benchmark_reports.py holds the committed pages to that).

    python benchmarks/_report.py [--out-dir docs/results]    # the index and every page
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "results"

# script -> (page title, one line for the index), in the order the index lists them
PAGES = {
    "quality": ("Quality at equal training budgets",
                "LoRAPrune, Taylor and the other criteria on SmolLM2-135M at 20% and 50%, seeds, two domains"),
    "heldout": ("Against the strongest baselines, on text nobody tuned to",
                "LoRAPrune, prunetune's best one-shot and Torch-Pruning at equal size and tokens, three domains, "
                "seeds"),
    "allocation": ("How a budget is shared by heads and channels",
                   "the cost split against heads-first, masks only, no training"),
    "loram": ("LoRAM at 20% and 35%", "the recovered adapter's share of the full-model LoRA's gain, with and "
                                      "without alignment"),
    "count_cost": ("What counting tensor memory costs", "six LoRAPrune steps counted every step, the first two "
                                                        "and not at all"),
    "scale": ("Memory per process: one process, DDP and FSDP",
              "per-process peaks on two CPU processes, and the state formula extrapolated to LLaMA2-7B"),
    "plan_check": ("The memory planner against measurement", "84 plans beside the measured peaks"),
    "plan_papers": ("The papers' models, planned", "LoRAM's and LoRAPrune's configurations at their papers' sizes"),
    "memory_claims": ("Memory claims, measured", "LoRAM, QLoRAM and the LoRA-guided criterion on layers of the "
                                                 "papers' shapes"),
    "serving": ("Serving speed in vLLM and llama.cpp", "prefill and decode of pruned SmolLM2-135M against the "
                                                       "FLOPs ratio"),
    "teacher_cache": ("A second model or a cache of its top k", "what full-parameter distillation's teacher costs "
                                                                   "in memory and time, and what it gives"),
    "moe_example": ("A mixture of experts pruned by expert", "routing per expert and the budget's split on a small "
                                                             "Mixtral trained here"),
}


def add_options(parser: argparse.ArgumentParser) -> None:
    """--report and --out-dir, the same for every script."""
    parser.add_argument("--report", action="store_true",
                        help="write the results page (docs/results/SCRIPT.md) from the committed results and stop")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="where --report writes its page")


def machine() -> str:
    """How a results file names the machine it ran on."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def invocation(script: str, python: str = "python") -> str:
    """The command line that is running, as a results file records it: the script path from the
    repository root, whatever the current directory."""
    return shlex.join([python, f"benchmarks/{script}.py", *sys.argv[1:]])


def provenance(command, machine, date, torch=None) -> str:
    """The lines that precede every table: how to reproduce its numbers, where and when they were taken.
    Each may be one value or the values of several cells (their distinct values are listed; dates as a range)."""
    commands, machines, torches = (distinct(v) for v in (command, machine, torch))
    where = "; ".join(machines) or "not recorded"
    if torches:
        where += "; torch " + ", ".join(torches)
    return "\n".join([*(f"- command: `{c}`" for c in commands), f"- machine: {where}",
                      f"- date: {date_range(distinct(date)) or 'not recorded'}"])


def distinct(values) -> list[str]:
    """The distinct values given (one value or several), sorted; None left out."""
    values = [values] if values is None or isinstance(values, str) else list(values)
    return sorted({v for v in values if v is not None})


def section(heading: str, provenance: str, *body: str) -> str:
    """One table of a page: its heading, its provenance, then the table and any notes."""
    return "\n\n".join([f"## {heading}", provenance, *body])


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells are printed as they are given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def date_range(dates: list[str]) -> str:
    if not dates:
        return ""
    return dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"


def write_page(script: str, sources: list[str], sections: list[str], out_dir: Path) -> Path:
    """docs/results/<script>.md: the title, where it comes from, then the sections (each a heading,
    its provenance and its table, joined by blank lines)."""
    title = PAGES[script][0]
    files = ", ".join(f"`{source}`" for source in sources)
    text = "\n\n".join([f"# {title}",
                        f"Generated by `python benchmarks/{script}.py --report` from {files}; do not edit by hand.",
                        *sections]) + "\n"
    return write(Path(out_dir) / f"{script}.md", text)


def write(path: Path, text: str) -> Path:
    """Written beside its name and renamed, so an interrupted report leaves the old page whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
    print(f"wrote {path}")
    return path


def relative(path: Path) -> str:
    """A results file's name on the page: from the repository root, so the page is the same from any directory."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def index() -> str:
    lines = ["# Benchmark results", "",
             "Each page is generated from the committed summaries in `benchmarks/results/` by its benchmark "
             "script's `--report`; every table names the command that produced its numbers, the machine and the "
             "date. `python benchmarks/_report.py` regenerates them all.", ""]
    lines += [f"- [{title}]({script}.md): {line}" for script, (title, line) in PAGES.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="write docs/results: the index and every benchmark's page")
    parser.add_argument("--out-dir", type=Path, default=DOCS)
    args = parser.parse_args()
    write(args.out_dir / "index.md", index())
    for script in PAGES:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--report",
                        "--out-dir", str(args.out_dir)], check=True)


if __name__ == "__main__":
    main()
