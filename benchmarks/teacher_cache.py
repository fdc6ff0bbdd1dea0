"""What a full-parameter distillation's teacher costs: a second model in memory against its top-k cached on disk.

    python benchmarks/teacher_cache.py [--steps 40] [--ratio 0.5] [--runs runs/teacher-cache]
    python benchmarks/teacher_cache.py --report     # docs/results/teacher_cache.md from the results file

SmolLM2-135M is cut once by Taylor to half its prunable parameters (`prunetune prune --method taylor`, no
recovery), then `prunetune train` trains every weight of the cut model for STEPS steps on pydoc, the same
seed, batch and data order for every row:

- `no teacher`: the language-model loss alone;
- `second copy`: distillation from the unpruned model, loaded a second time and run on every step;
- `cache k=K, built`: distillation from the unpruned model's top K next tokens; this run builds the
  cache (one teacher pass over every training block, the teacher freed before training);
- `cache k=K, reused`: the same run again, reading the cache the first one built (another seed, learning
  rate or student would read it the same way).

Each row records seconds per step (the teacher's share apart), the training's peak tensor memory, the
cache's size and build time, and perplexity on pydoc's held-out split, stdlib code and the Debian
handbook (20 windows of 512 tokens). One thread, one run at a time (beside other work: the times
compare rows of one results file, not other pages).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)
from _cells import check_settings, load_results, save_cell
from handbook import handbook_spec

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "teacher_cache.json"
SCRIPT = "teacher_cache"
DOMAINS = ("pydoc", "stdlib-code", "handbook")
# row -> the `prunetune train` arguments beyond the common ones ({cache} the row's cache directory)
ROWS = {
    "no teacher": ["--no-distill"],
    "second copy": ["--distill", "--teacher", "{model}"],
    "cache k=64, built": ["--distill", "--teacher", "{model}", "--teacher-cache", "{runs}/cache-64",
                          "--teacher-top-k", "64"],
    "cache k=64, reused": ["--distill", "--teacher", "{model}", "--teacher-cache", "{runs}/cache-64",
                           "--teacher-top-k", "64"],
}


def prunetune(*args: str) -> None:
    print("$ prunetune", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "prunetune.cli", *args], check=True)


def evaluate(model: Path, args) -> dict:
    specs = ["builtin:pydoc@eval", "builtin:stdlib-code@eval", handbook_spec()]
    out = model / "eval.json"
    prunetune("eval", str(model), "--data", ",".join(specs), "--seq-len", "512", "--max-windows",
              str(args.eval_windows), "--json", str(out))
    scored = json.loads(out.read_text())["perplexity"]
    return {d: r["perplexity"] for d, r in zip(DOMAINS, scored)}


def run_row(args, row: str, pruned: Path) -> dict:
    out = args.runs / row.replace(" ", "-").replace(",", "").replace("=", "")
    extra = [a.format(model=args.model, runs=args.runs) for a in ROWS[row]]
    started = time.time()
    prunetune("train", str(pruned), "--data", "train=builtin:pydoc", "--fixed-mixture", "--steps", str(args.steps),
              "--batch-size", "4", "--seq-len", "128", "--lr", str(args.lr), "--seed", "0", *extra, "--no-eval",
              "--out", str(out), "--overwrite")
    wall = time.time() - started
    rec = json.loads((out / "prunetune.json").read_text())
    training = rec["training"]
    distill = training.get("distill") or {}
    cell = {"row": row, "steps": args.steps, "wall_seconds": round(wall, 1),
            "seconds_per_step": training["seconds"] / len(training["history"]),
            "teacher_seconds_per_step": distill.get("teacher_seconds_per_step", 0.0),
            "peak_memory_bytes": training["peak_memory_bytes"], "peak_rss_bytes": training.get("peak_rss_bytes"),
            "teacher_model_bytes": distill.get("teacher_model_bytes"), "cache": distill.get("teacher_cache"),
            "perplexity": evaluate(out, args), "date": time.strftime("%Y-%m-%d"), "machine": _report.machine(),
            "torch": rec.get("torch")}
    shutil.rmtree(out)  # the trained weights: nobody reads them again
    return cell


def write_report(results: dict, source: Path, out_dir: Path) -> None:
    cells = results["cells"]
    rows = []
    for row in ROWS:
        c = cells.get(row)
        if not c:
            continue
        cache = c.get("cache") or {}
        rows.append([row, *(f"{c['perplexity'][d]:.2f}" for d in DOMAINS), f"{c['seconds_per_step']:.2f}",
                     f"{c['teacher_seconds_per_step']:.2f}", f"{c['peak_memory_bytes'] / 2**20:,.0f}",
                     f"{c['teacher_model_bytes'] / 2**20:,.0f}" if c.get("teacher_model_bytes") else "",
                     f"{cache['bytes'] / 2**20:,.1f}" if cache.get("bytes") else "",
                     f"{cache['build_seconds']:.0f}" if cache.get("build_seconds") else ""])
    s = results["settings"]
    dated = [c for c in cells.values() if "machine" in c]
    provenance = _report.provenance(
        f"python benchmarks/teacher_cache.py --steps {s['steps']} --ratio {s['ratio']} --lr {s['lr']} "
        f"--eval-windows {s['eval_windows']}", [c["machine"] for c in dated], [c["date"] for c in dated],
        [c.get("torch") for c in dated])
    body = (f"SmolLM2-135M cut by Taylor to {s['ratio']:.0%} of its prunable parameters, then {s['steps']} "
            "full-parameter steps of 4 x 128 tokens on pydoc, seed 0, the same batches for every row. s/step is the "
            "whole step, the teacher's share (its forward, or the cache's lookup) apart; the peak is the "
            "training's peak of live tensors (the cache's build comes before training and is not in it). "
            "Perplexity over at most "
            f"{s['eval_windows']} windows of 512 tokens of each domain; the training domain is pydoc. The rows ran one "
            "at a time but beside other jobs on the same two cores (the `cache k=64, built` row beside the most), "
            "so compare the teacher's seconds per step and the memory between rows, not the whole step's time. "
            "The reused cache gives exactly the built run's perplexities: the same batches, the same targets.")
    table = _report.table(["teacher", "pydoc", "stdlib-code", "handbook", "s/step", "teacher s/step",
                           "peak tensor MiB", "second model MiB", "cache MiB", "cache build s"], rows)
    _report.write_page(SCRIPT, [_report.relative(source)],
                       [_report.section("A second model against a cache of its top k", provenance, body, table)],
                       out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=Path, default=Path("runs/teacher-cache"))
    _report.add_options(parser)
    args = parser.parse_args()
    results = load_results(args.results)
    if args.report:
        write_report(results, args.results, args.out_dir)
        return
    settings = {k: v for k, v in vars(args).items() if k in ("model", "steps", "ratio", "lr", "eval_windows")}
    check_settings(results, settings, args.results)
    args.runs = args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)
    pruned = args.runs / "pruned"
    if not (pruned / "prunetune.json").exists():
        prunetune("prune", args.model, "--method", "taylor", "--ratio", str(args.ratio), "--data", "builtin:pydoc",
                  "--calib-samples", "10", "--no-eval", "--out", str(pruned), "--overwrite")
    for row in ROWS:
        if row in load_results(args.results)["cells"]:
            continue
        print(f"== {row}", flush=True)
        save_cell(args.results, row, run_row(args, row, pruned), settings)
    write_report(load_results(args.results), args.results, Path("/tmp/teacher-cache-page"))


if __name__ == "__main__":
    main()
