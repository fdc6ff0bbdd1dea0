"""Quality at equal training budgets on the real SmolLM2-135M: LoRAPrune (the paper's recipe and
prunetune's default) against LLM-Pruner's Taylor + LoRA recovery and the other one-shot criteria.

Every cell is one `prunetune prune` process (same data, layers, batch, learning rate and steps for
every method), then one `prunetune eval` of the result on two held-out sets: the training domain
(builtin:pydoc's held-out tenth) and the other built-in domain (builtin:stdlib-code's held-out
tenth), because users prune on one corpus and serve on another. Each finished cell is written at
once to the results file (benchmarks/results/quality.json by default) and skipped on the next run,
so the table can be completed across sessions. A cell is a summary (perplexities, parameters, kept
shape, time, peak memory); the step-by-step history and the kept indices stay in the cell's run
directory. `--report` writes the tables from the results file to docs/results/quality.md.

    python benchmarks/quality.py                    # run the missing cells, in priority order
    python benchmarks/quality.py --only 0.5/loraprune-paper/0   # one cell (ratio/config/seed)
    python benchmarks/quality.py --report           # the tables, mean ± standard deviation over seeds

Several workers may share the plan (each claims the next free cell), e.g. one per core:
    OMP_NUM_THREADS=1 python benchmarks/quality.py & OMP_NUM_THREADS=1 python benchmarks/quality.py &
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)
from _cells import check_settings, claim, load_results, release, save_cell, stat

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quality.json"

# config name -> (what it is, `prunetune prune` arguments; {steps} is the training budget)
CONFIGS = {
    "loraprune-paper": ("LoRAPrune, the paper's recipe (official code: heads-first split, per-module "
                        "normalisation, no distillation)",
                        "--method loraprune --steps {steps} --split heads-first --normalize module --no-distill "
                        "--prune-warmup 0.1 --prune-cooldown 0.1"),
    "loraprune-distill": ("LoRAPrune with self-distillation from the unpruned base (distillation only) and the "
                          "cost split, the official code's schedule",
                          "--method loraprune --steps {steps} --split cost --normalize model --distill --teacher base "
                          "--distill-alpha 1 --prune-warmup 0.1 --prune-cooldown 0.1"),
    "loraprune-cost": ("LoRAPrune with the cost split, no distillation, the official code's schedule",
                       "--method loraprune --steps {steps} --split cost --normalize model --no-distill "
                       "--prune-warmup 0.1 --prune-cooldown 0.1"),
    "loraprune-distill-early": ("LoRAPrune distilled, cost split, target reached at half the steps "
                                "(--prune-warmup 0.05 --prune-cooldown 0.5)",
                                "--method loraprune --steps {steps} --split cost --normalize model --distill "
                                "--distill-alpha 1 --prune-warmup 0.05 --prune-cooldown 0.5"),
    "loraprune-distill-early-mix": ("prunetune's default LoRAPrune: distilled with the language-model loss "
                                    "mixed in half and half (--distill-alpha 0.5), cost split, target reached "
                                    "at half the steps",
                                    "--method loraprune --steps {steps} --split cost --normalize model --distill "
                                    "--distill-alpha 0.5 --prune-warmup 0.05 --prune-cooldown 0.5"),
    "loraprune-distill-earlier": ("LoRAPrune distilled, cost split, target reached at 30% of the steps "
                                  "(--prune-warmup 0.05 --prune-cooldown 0.7)",
                                  "--method loraprune --steps {steps} --split cost --normalize model --distill "
                                  "--distill-alpha 1 --prune-warmup 0.05 --prune-cooldown 0.7"),
    "taylor": ("Taylor + LoRA recovery, as LLM-Pruner runs it (heads-first split)",
               "--method taylor --recover-steps {steps} --split heads-first --no-distill"),
    "taylor-distill": ("Taylor + distilled LoRA recovery (the source model loaded again as teacher)",
                       "--method taylor --recover-steps {steps} --split heads-first --distill"),
    "lora-guided": ("LoRA-guided one-shot + LoRA recovery (cost split)",
                    "--method lora-guided --recover-steps {steps} --split cost --no-distill"),
    "wanda-sp": ("Wanda-sp + LoRA recovery (heads-first split)",
                 "--method wanda-sp --recover-steps {steps} --split heads-first --no-distill"),
    "magnitude": ("magnitude + LoRA recovery (heads-first split)",
                  "--method magnitude --recover-steps {steps} --split heads-first --no-distill"),
}
# prunetune's default LoRAPrune (early-mix), the paper's recipe and LLM-Pruner's: three seeds each
SEEDED = ("loraprune-distill-early-mix", "taylor", "loraprune-paper")
ONE_SEED = ("lora-guided", "taylor-distill", "wanda-sp", "magnitude", "loraprune-cost")
LONG = ("loraprune-distill-early-mix", "taylor")  # 3x the steps at 50%, one seed
DEFAULT = "loraprune-distill-early-mix"
EVAL_SETS = {"pydoc": "builtin:pydoc@eval", "stdlib-code": "builtin:stdlib-code@eval"}


def plan(ratios: list[float]) -> list[tuple[float, str, int, int]]:
    """(ratio, config, seed, steps multiplier) in the order they are run: the cells the targets need
    first (seed 0 at every ratio, then seeds 1 and 2), then the long column, the one-seed rows, the rest."""
    cells = []
    for seed in (0, 1, 2):
        for ratio in sorted(ratios, reverse=True):
            cells += [(ratio, config, seed, 1) for config in SEEDED]
    cells += [(0.5, config, 0, 3) for config in LONG]
    for ratio in sorted(ratios, reverse=True):
        cells += [(ratio, config, 0, 1) for config in ONE_SEED]
    # the schedule and loss variants that led to the default (two seeds of distillation alone)
    cells += [(ratio, "loraprune-distill", seed, 1) for seed in (0, 1) for ratio in sorted(ratios, reverse=True)]
    cells += [(0.5, "loraprune-distill-early", 0, 1), (0.5, "loraprune-distill-earlier", 0, 1)]
    return cells


def cell_key(ratio: float, config: str, seed: int, multiplier: int) -> str:
    return f"{ratio}/{config}/{seed}" + (f"/x{multiplier}" if multiplier != 1 else "")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def evaluate(model: str, args, out_json: Path) -> dict:
    command = [sys.executable, "-m", "prunetune.cli", "eval", model, "--data", ",".join(EVAL_SETS.values()),
               "--seq-len", str(args.eval_seq_len), "--max-windows", str(args.eval_windows), "--json", str(out_json)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)
    scored = json.loads(out_json.read_text())["perplexity"]  # one entry per data spec, in order
    return {name: {"perplexity": r["perplexity"], "tokens": r["tokens_scored"], "protocol": r["protocol"]}
            for name, r in zip(EVAL_SETS, scored)}


def run_cell(ratio: float, config: str, seed: int, multiplier: int, args) -> dict:
    steps = args.steps * multiplier
    out = args.runs / cell_key(ratio, config, seed, multiplier).replace("/", "_")
    command = [sys.executable, "-m", "prunetune.cli", "prune", args.model,
               "--ratio", str(ratio), "--layers", args.layers,
               "--data", args.data, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--lr", str(args.lr), "--seed", str(seed), "--no-eval", "--out", str(out), "--overwrite",
               *CONFIGS[config][1].format(steps=steps).split()]
    started = time.time()
    finished = out / "prunetune.json"
    previous = json.loads(finished.read_text()) if finished.exists() else None
    if previous and previous["settings"]["seed"] == seed and len(previous["training"]["history"]) == steps:
        print(f"reusing the finished prune in {out}", flush=True)  # a worker stopped before its evaluation
    else:
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    record = json.loads(finished.read_text())
    training = record["training"]
    return {
        "ratio": ratio, "config": config, "seed": seed, "steps": steps,
        "command": "prunetune " + " ".join(command[3:]),
        "perplexity": evaluate(str(out), args, out / "eval.json"),
        "parameters": record["parameters"]["after"]["total"],
        "ratio_achieved": record["parameters"]["ratio_achieved"],
        "kept_shape": kept_shape(record["kept"]),
        "train_seconds": training["seconds"],
        "seconds_per_step": training["seconds"] / steps,
        "peak_memory_bytes": training["peak_memory_bytes"],
        "peak_memory_kind": training["peak_memory_kind"],
        "distill": training.get("distill"),
        "wall_seconds": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch": record.get("torch"),
    }


def kept_shape(kept: dict) -> dict:
    """What a run's `kept` (the index of every kept head and channel, ~270 KB of JSON) comes to: the hidden size
    and each run of layers that kept the same numbers of heads, key/value heads and MLP channels."""
    layers: list[dict] = []
    for entry in kept["layers"]:
        shape = {"heads": entry["num_heads"], "kv_heads": entry["num_kv_heads"], "channels": entry["num_channels"]}
        if layers and layers[-1]["shape"] == shape and layers[-1]["last"] == entry["layer"] - 1:
            layers[-1]["last"] = entry["layer"]
        else:
            layers.append({"first": entry["layer"], "last": entry["layer"], "shape": shape})
    return {"hidden": kept["num_hidden"],
            "layers": [{"layers": f"{r['first']}-{r['last']}" if r["last"] > r["first"] else str(r["first"]),
                        **r["shape"]} for r in layers]}


def groups(results: dict) -> dict:
    """The cells by (ratio, config, steps multiplier): the seeds of one row."""
    rows: dict = {}
    for key, cell in results["cells"].items():
        if key != "dense":
            multiplier = cell["steps"] // results["settings"]["steps"]
            rows.setdefault((cell["ratio"], cell["config"], multiplier), []).append(cell)
    return rows


def report(results: dict) -> str:
    cells = results["cells"]
    dense = cells.get("dense")
    lines = []
    if dense:
        lines.append("Unpruned: " + ", ".join(f"{name} {v['perplexity']:.2f}"
                                              for name, v in dense["perplexity"].items()))
        lines.append("")
    lines += ["| ratio | method | steps | seeds | perplexity pydoc (trained domain) | perplexity stdlib-code "
              "(other domain) | parameters | s/step | peak tensor memory MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (ratio, config, multiplier), group in sorted(groups(results).items(),
                                                     key=lambda g: (-g[0][0], g[0][2], g[0][1])):
        ppl = {name: [c["perplexity"][name]["perplexity"] for c in group] for name in EVAL_SETS}
        lines.append(f"| {ratio:.0%} | {config} | {group[0]['steps']} | {len(group)} | {stat(ppl['pydoc'])} | "
                     f"{stat(ppl['stdlib-code'])} | {group[0]['parameters']:,} | "
                     f"{statistics.mean(c['seconds_per_step'] for c in group):.2f} | "
                     f"{max(c['peak_memory_bytes'] for c in group) / 2**20:.0f} |")
    lines += ["", "Configurations:", ""] + [f"- `{name}`: {text}; `{args}`" for name, (text, args) in CONFIGS.items()]
    return "\n".join(lines)


def targets(results: dict) -> str:
    """The targets against the default LoRAPrune: at each ratio below Taylor + recovery by more than two
    standard deviations on both domains, at 50% at least 15% below the paper's recipe, and a distilled
    step's peak at most 1.1x a plain one's (the cost split without distillation)."""
    rows_by_key = groups(results)

    def seeds(ratio: float, config: str) -> dict | None:
        group = rows_by_key.get((ratio, config, 1))
        if not group or len(group) < 2:
            return None
        return {name: [c["perplexity"][name]["perplexity"] for c in group] for name in EVAL_SETS} | {"n": len(group)}

    def both(s: dict, bold: bool = False) -> str:
        return " / ".join(f"**{stat(s[name])}**" if bold else stat(s[name]) for name in EVAL_SETS)

    rows = []
    for ratio in (0.5, 0.2):
        ours, taylor = seeds(ratio, DEFAULT), seeds(ratio, "taylor")
        if not (ours and taylor):
            continue
        counted = f"{ours['n']} seeds each" if ours["n"] == taylor["n"] else f"{ours['n']} and {taylor['n']} seeds"
        lower = [1 - statistics.mean(ours[n]) / statistics.mean(taylor[n]) for n in EVAL_SETS]
        margin = [(statistics.mean(taylor[n]) - statistics.mean(ours[n]))
                  / max(statistics.stdev(taylor[n]), statistics.stdev(ours[n])) for n in EVAL_SETS]
        rows.append([f"at {ratio:.0%}, the default below Taylor + recovery by more than two standard deviations "
                     "of either",
                     f"{both(ours, True)} against {both(taylor)} ({counted}): {lower[0]:.0%} and {lower[1]:.0%} "
                     f"lower, by {margin[0]:.0f} and {margin[1]:.0f} of the larger standard deviation",
                     "met" if min(margin) > 2 else "missed"])
    ours, paper = seeds(0.5, DEFAULT), seeds(0.5, "loraprune-paper")
    if ours and paper:
        lower = [1 - statistics.mean(ours[n]) / statistics.mean(paper[n]) for n in EVAL_SETS]
        rows.append(["at 50%, distilled LoRAPrune at least 15% below the paper's recipe at equal steps",
                     f"{both(ours)} against {both(paper)} ({paper['n']} seeds): **{lower[0]:.0%} and {lower[1]:.0%} "
                     "lower**", "met" if min(lower) >= 0.15 else "missed"])
    distilled, plain = rows_by_key.get((0.5, DEFAULT, 1)), rows_by_key.get((0.5, "loraprune-cost", 1))
    if distilled and plain:
        ours, theirs = (max(c["peak_memory_bytes"] for c in g) for g in (distilled, plain))
        rows.append(["a distilled step's peak memory at most 1.1x a plain one's (the cost split, 50%)",
                     f"{ours / 2**20:,.0f} against {theirs / 2**20:,.0f} MiB: **{ours / theirs:.3f}x**",
                     "met" if ours <= 1.1 * theirs else "missed"])
    return _report.table(["target", "measured", ""], rows) if rows else ""


def command(results: dict) -> str:
    """The command that produced the cells: every cell ran under these settings (the script refuses
    others), whichever worker or `--only` ran it."""
    s = results["settings"]
    ratios = sorted({c["ratio"] for key, c in results["cells"].items() if key != "dense"})
    return ("python benchmarks/quality.py " + f"--model {s['model']} --ratios {','.join(map(str, ratios))} "
            f"--steps {s['steps']} --batch-size {s['batch_size']} --seq-len {s['seq_len']} --lr {s['lr']} "
            f"--data {s['data']} --layers {s['layers']} --eval-seq-len {s['eval_seq_len']} "
            f"--eval-windows {s['eval_windows']}")


def write_report(results: dict, source: Path, out_dir: Path) -> None:
    cells = list(results["cells"].values())
    provenance = _report.provenance(command(results), [c["machine"] for c in cells], [c["date"] for c in cells],
                                    [c.get("torch") for c in cells])
    sections = [_report.section("Perplexity, parameters, time and memory per method", provenance,
                                "Mean ± standard deviation over the seeds of each row; s/step is the mean and the "
                                "peak tensor memory the largest over them. Each cell's date, machine and "
                                "`prunetune prune` command are in the results file.",
                                report(results))]
    if targets(results):
        sections.append(_report.section(f"The default (`{DEFAULT}`) against the targets", provenance,
                                        targets(results)))
    _report.write_page("quality", [_report.relative(source)], sections, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--data", default="builtin:pydoc")
    parser.add_argument("--layers", default="paper", help="the same layers for every method")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=60)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"))
    parser.add_argument("--only", action="append", help="run just this cell (ratio/config/seed[/xN]); repeatable")
    parser.add_argument("--max-cells", type=int, default=None, help="stop after this many new cells")
    _report.add_options(parser)
    args = parser.parse_args()

    results = load_results(args.results)
    settings = {k: v for k, v in vars(args).items() if k in ("model", "steps", "batch_size", "seq_len", "lr", "data",
                                                             "layers", "eval_seq_len", "eval_windows")}
    if args.report:
        write_report(results, args.results, args.out_dir)
        return
    check_settings(results, settings, args.results)
    args.runs.mkdir(parents=True, exist_ok=True)
    if "dense" not in results["cells"] and claim(args.runs, "dense", "quality.py"):
        save_cell(args.results, "dense", {"perplexity": evaluate(args.model, args, args.runs / "dense-eval.json"),
                                          "date": time.strftime("%Y-%m-%d"), "machine": machine()}, settings)
    cells = plan([float(r) for r in args.ratios.split(",")])
    if args.only:
        wanted = set(args.only)
        cells = [c for c in cells if cell_key(*c) in wanted] + [
            (float(k.split("/")[0]), k.split("/")[1], int(k.split("/")[2]),
             int(k.split("/")[3][1:]) if len(k.split("/")) > 3 else 1)
            for k in wanted if k not in {cell_key(*c) for c in cells}]
    done = 0
    for cell in cells:
        key = cell_key(*cell)
        if key in load_results(args.results)["cells"]:
            continue
        if args.max_cells is not None and done >= args.max_cells:
            break
        if not claim(args.runs, key, "quality.py"):
            continue
        print(f"== cell {key}", flush=True)
        save_cell(args.results, key, run_cell(*cell, args), settings)
        release(args.runs, key)
        done += 1
    print(report(load_results(args.results)))


if __name__ == "__main__":
    main()
