"""LoRAM on the real SmolLM2-135M: train on a 50%-pruned model, serve on the full one.

    python benchmarks/loram.py [--steps 100] [--out runs/loram-bench]

1. `prunetune loram run smollm2-135m --ratio 0.5 --method stru --baseline --ablation ...`: Taylor
   pruning of half the prunable parameters (layers `paper`), full-parameter alignment on
   builtin:pydoc, LoRA on builtin:stdlib-code, recovery; the baseline LoRA trains on the full model
   for the same steps; the ablation trains on the unaligned pruned model.
2. QLoRAM: `prunetune loram train OUT/aligned --quant nf4` with the same settings, recovered and
   evaluated on the full model the same way.

`--qloram-only` skips the LoRAM run and its ablation: it prunes and aligns the same way, trains the NF4
adapter and the full-model baseline, and compares those two (about 1 h on 2 CPU cores instead of 1.5).

`--cells` runs the 20% and 35% cells (issue 17): each ratio with and without alignment, and at 35%
alignment at a lower learning rate, with fewer steps, and on text mixed from both domains; each cell
is the recovered adapter on the full model, evaluated as the 50% row is, and goes to
benchmarks/results/loram_cells.json as soon as it ends (finished cells are skipped next time).
`--only CELL ...` splits the cells between workers; `--report` writes the table of them to
docs/results/loram.md, from the results file alone (the 50% rows and the two references, from the `loram
run` of the first part, are kept in it too).

`--memory-only N` trains each adapter for N steps only, on the (unaligned) pruned model, to read the
three training peaks quickly: the peak comes in the first steps and does not depend on alignment.

Then it prints the table of docs/methods/loram.md and checks the targets: the full model with the recovered
adapter gains at least 80% of the baseline's in-domain perplexity improvement, with at most 60% of
its peak training memory (35% with NF4); without recovery and without alignment the result is worse.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

COMMON = ["--batch-size", "4", "--seq-len", "256", "--gradient-checkpointing"]


def prunetune(*args) -> None:
    command = [sys.executable, "-m", "prunetune.cli", *map(str, args)]
    print("$ prunetune " + " ".join(map(str, args)), flush=True)
    done = subprocess.run(command, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", COLUMNS="120"))
    if done.returncode:
        sys.exit(done.returncode)


def evaluate(model: str, adapter: Path, windows: int) -> dict:
    from peft import PeftModel

    from prunetune import load_model
    from prunetune.evaluate.perplexity import perplexity

    base, tokenizer = load_model(model)
    wrapped = PeftModel.from_pretrained(base, str(adapter))
    return {key: perplexity(wrapped, tokenizer, spec, 256, max_windows=windows).perplexity
            for key, spec in (("in_domain", "builtin:stdlib-code@eval"), ("out_of_domain", "builtin:pydoc@eval"))}


def train_nf4(args, aligned: Path) -> Path:
    qlora = args.out / "qloram-adapter"
    if not (qlora / "prunetune.json").exists():
        prunetune("loram", "train", aligned, "--quant", "nf4", "--data", "builtin:stdlib-code",
                  "--steps", args.steps, "--lr", "5e-4", *COMMON, "--out", qlora, "--overwrite")
        prunetune("loram", "recover", qlora, "--pruned", aligned, "--full", "smollm2-135m",
                  "--out", args.out / "qloram-full-adapter", "--overwrite")
    return qlora


def qloram_only(args, run: Path) -> None:
    """Prune and align as `loram run` does, then the NF4 adapter and the baseline, and compare them."""
    from prunetune import load_model
    from prunetune.evaluate.perplexity import perplexity

    if not (run / "aligned" / "prunetune.json").exists():
        prunetune("loram", "prune", "smollm2-135m", "--ratio", "0.5", "--method", "stru", "--data", "builtin:pydoc",
                  "--out", run / "pruned", "--overwrite")
        prunetune("loram", "align", run / "pruned", "--no-distill", "--data", "builtin:pydoc",
                  "--steps", args.align_steps, "--lr", "1e-4", *COMMON, "--out", run / "aligned", "--overwrite")
    qlora = train_nf4(args, run / "aligned")
    baseline = args.out / "baseline-adapter"
    if not (baseline / "prunetune.json").exists():
        prunetune("loram", "train", "smollm2-135m", "--data", "builtin:stdlib-code", "--steps", args.steps,
                  "--lr", "5e-4", *COMMON, "--out", baseline, "--overwrite")
    full, tokenizer = load_model("smollm2-135m")
    untouched = {key: perplexity(full, tokenizer, spec, 256, max_windows=args.max_windows).perplexity
                 for key, spec in (("in_domain", "builtin:stdlib-code@eval"), ("out_of_domain", "builtin:pydoc@eval"))}
    del full
    q = json.loads((qlora / "prunetune.json").read_text())
    b = json.loads((baseline / "prunetune.json").read_text())
    rows = {
        "full model, untouched": untouched,
        "full model + recovered QLoRAM (NF4) adapter": evaluate("smollm2-135m", args.out / "qloram-full-adapter",
                                                                args.max_windows) | {
            "peak_memory_bytes": q["training"]["peak_memory_bytes"], "train_seconds": q["training"]["seconds"]},
        "full model + LoRA trained on it (baseline)": evaluate("smollm2-135m", baseline, args.max_windows) | {
            "peak_memory_bytes": b["training"]["peak_memory_bytes"], "train_seconds": b["training"]["seconds"]},
    }
    print_table(rows, rows["full model + LoRA trained on it (baseline)"], untouched)
    print(f"\nparameter reduction ratio: {q['parameters']['reduction_ratio']:.2f}x (NF4)")
    ok = q["training"]["peak_memory_bytes"] <= 0.35 * b["training"]["peak_memory_bytes"]
    print(f"{'PASS' if ok else 'FAIL'} QLoRAM training peak memory <= 35% of the baseline's")


def memory_only(args, run: Path) -> None:
    """Training peak memory of the baseline, LoRAM and QLoRAM adapters after `args.memory_only` steps each."""
    pruned = run / "pruned"
    if not (pruned / "prunetune.json").exists():
        prunetune("loram", "prune", "smollm2-135m", "--ratio", "0.5", "--method", "stru", "--data", "builtin:pydoc",
                  "--out", pruned, "--overwrite")
    out = args.out / "memory"
    peaks = {}
    for name, model, extra in (("full model, LoRA (baseline)", "smollm2-135m", []),
                               ("pruned model, LoRA (LoRAM)", pruned, []),
                               ("pruned model, NF4 + LoRA (QLoRAM)", pruned, ["--quant", "nf4"])):
        adapter = out / name.split(",")[0].replace(" ", "-") / ("nf4" if extra else "lora")
        if not (adapter / "prunetune.json").exists():
            prunetune("loram", "train", model, *extra, "--data", "builtin:stdlib-code", "--steps", args.memory_only,
                      "--lr", "5e-4", *COMMON, "--out", adapter, "--overwrite")
        record = json.loads((adapter / "prunetune.json").read_text())
        training = record["training"]
        peaks[name] = (training["peak_memory_bytes"], training["peak_memory_kind"], record["parameters"],
                       training.get("peak_rss_bytes"))
    base, _, _, base_rss = peaks["full model, LoRA (baseline)"]
    print(f"\n| {args.memory_only} training steps, batch 4 x 256 | reduction ratio | training peak GiB | vs baseline "
          "| peak RSS GiB | vs baseline |")
    print("|---|---|---|---|---|---|")
    for name, (peak, kind, parameters, rss) in peaks.items():
        rss_cells = f"{rss / 2**30:.2f} | {rss / base_rss:.0%}" if rss and base_rss else "– | –"
        print(f"| {name} | {parameters['reduction_ratio']:.2f}x | {peak / 2**30:.2f} | "
              f"{peak / base:.0%} | {rss_cells} |")
    print(f"\nmemory: {next(iter(peaks.values()))[1]}")
    for name, limit in (("pruned model, LoRA (LoRAM)", 0.60), ("pruned model, NF4 + LoRA (QLoRAM)", 0.35)):
        print(f"{'PASS' if peaks[name][0] <= limit * base else 'FAIL'} {name}: training peak <= {limit:.0%} of the "
              "baseline's")


# --cells: the paper's "scaling law of parameter reduction" in small. Each cell is a ratio and how the
# pruned model was aligned before the adapter trained on it; every finished cell goes to the results
# file at once and is skipped on the next run, so the table can be finished across sessions.
# "distill": the pruned model learns the full model's next-token distributions (`loram align`'s
# default); the others are the paper's continued pre-training (`--no-distill`).
ALIGNMENTS = {
    "aligned": {"lr": "1e-4", "steps": None, "data": "builtin:pydoc"},  # the 50% row's alignment
    "unaligned": None,
    "aligned-lr1e-5": {"lr": "1e-5", "steps": None, "data": "builtin:pydoc"},
    "aligned-25-steps": {"lr": "1e-4", "steps": 25, "data": "builtin:pydoc"},
    "aligned-mixed": {"lr": "1e-4", "steps": None, "data": "MIXED"},  # both domains' training text
    "distilled": {"lr": "1e-4", "steps": None, "data": "builtin:pydoc", "distill": True},
}
CELLS = [(0.5, "distilled"), (0.2, "distilled"), (0.35, "distilled"),
         (0.2, "aligned"), (0.2, "unaligned"), (0.35, "aligned"), (0.35, "unaligned"),
         (0.35, "aligned-lr1e-5"), (0.35, "aligned-25-steps"), (0.35, "aligned-mixed")]
CELL_RESULTS = Path(__file__).resolve().parent / "results" / "loram_cells.json"


def mixed_data(out: Path) -> Path:
    """The training text of both built-in domains in one local file (its last tenth is held out)."""
    from prunetune.data import load_examples

    path = out / "mixed-domains.txt"
    if not path.exists():
        texts = [e.prompt + e.response for spec in ("builtin:pydoc@train", "builtin:stdlib-code@train")
                 for e in load_examples(spec)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(texts))
    return path


def resumable(out: Path) -> list:
    """Checkpoint every 10 steps, and continue from the checkpoint an interrupted run left: a cell runs
    for hours on a 2-core CPU, longer than a working session."""
    from prunetune.runs.settings import checkpoint_dir_for

    return ["--checkpoint-every", 10] + (["--resume"] if (checkpoint_dir_for(out) / "checkpoint").exists() else [])


def run_cell(args, ratio: float, alignment: str) -> dict:
    """Prune at `ratio` (shared by the ratio's cells), align as `alignment` says, train the adapter on
    stdlib-code, recover it onto the full model and evaluate there."""
    import torch

    base = args.out / f"cells-{ratio}"
    pruned = base / "pruned"
    if not (pruned / "prunetune.json").exists():
        prunetune("loram", "prune", "smollm2-135m", "--ratio", ratio, "--method", "stru", "--data", "builtin:pydoc",
                  "--out", pruned, "--overwrite")
    trained_on = pruned
    how = ALIGNMENTS[alignment]
    if how is not None:
        trained_on = base / alignment
        data = mixed_data(args.out) if how["data"] == "MIXED" else how["data"]
        if not (trained_on / "prunetune.json").exists():
            prunetune("loram", "align", pruned, "--data", data, "--steps", how["steps"] or args.align_steps,
                      "--lr", how["lr"], "--distill" if how.get("distill") else "--no-distill", *COMMON,
                      *resumable(trained_on), "--out", trained_on, "--overwrite")
    adapter = base / f"adapter-{alignment}"
    if not (adapter / "prunetune.json").exists():
        prunetune("loram", "train", trained_on, "--data", "builtin:stdlib-code", "--steps", args.steps, "--lr", "5e-4",
                  *COMMON, *resumable(adapter), "--out", adapter, "--overwrite")
    full = base / f"full-adapter-{alignment}"
    if not (full / "adapter_config.json").exists():
        prunetune("loram", "recover", adapter, "--pruned", trained_on, "--full", "smollm2-135m", "--out", full,
                  "--overwrite")
    record = json.loads((adapter / "prunetune.json").read_text())
    return evaluate("smollm2-135m", full, args.max_windows) | {
        "ratio": ratio, "alignment": alignment, "alignment_settings": how,
        "reduction_ratio": record["parameters"]["reduction_ratio"],
        "peak_memory_bytes": record["training"]["peak_memory_bytes"], "train_seconds": record["training"]["seconds"],
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"}


def cells(args) -> None:
    results_path = args.results
    unknown = set(args.only or ()) - {f"{ratio}/{alignment}" for ratio, alignment in CELLS}
    if unknown:
        raise SystemExit(f"unknown cells {sorted(unknown)}; the cells are " + ", ".join(f"{r}/{a}" for r, a in CELLS))

    def finished() -> dict:
        return json.loads(results_path.read_text()) if results_path.exists() else {"cells": {}}

    for ratio, alignment in CELLS:
        key = f"{ratio}/{alignment}"
        if key in finished()["cells"] or (args.only and key not in args.only):
            continue
        print(f"== cell {key}", flush=True)
        cell = run_cell(args, ratio, alignment)
        # Read the file again before writing: another worker (--only) may have finished a cell meanwhile.
        results = finished()
        results["cells"][key] = cell
        results["settings"] = {"steps": args.steps, "align_steps": args.align_steps, "max_windows": args.max_windows,
                               "batch": COMMON}
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{key}: in-domain {cell['in_domain']:.3f}, out-of-domain {cell['out_of_domain']:.3f}", flush=True)


def cells_report(saved: dict) -> str:
    """The table of the cells: each ratio and alignment, its perplexities on the full model and
    the share of the baseline's in-domain gain (untouched -> baseline) it keeps. The 50% rows and the two
    references come from the `loram run` of the first part, kept in the results file's "references"."""
    results, align_steps = saved["cells"], saved.get("settings", {}).get("align_steps", 100)
    references = saved["references"]
    untouched, baseline = references["untouched"], references["baseline"]
    rows = dict(results) | {key: references[key] for key in ("0.5/aligned", "0.5/unaligned")}

    def order(key: str) -> tuple:  # by ratio; the 50% row's alignment first, no alignment last
        ratio, alignment = key.split("/")
        return float(ratio), alignment != "aligned", alignment == "unaligned", alignment

    lines = [["–", "full model, untouched", "1.00x", f"{untouched['in_domain']:.2f}",
              f"{untouched['out_of_domain']:.2f}", "0%"]]
    for key in sorted(rows, key=order):
        ratio, alignment = key.split("/")
        row = rows[key]
        share = (untouched["in_domain"] - row["in_domain"]) / (untouched["in_domain"] - baseline["in_domain"])
        how = ALIGNMENTS.get(alignment)
        described = "none" if how is None else (
            ("distillation from the full model, " if how.get("distill") else "next-token loss, ")
            + f"{how['steps'] or align_steps} steps at lr {how['lr']} on "
            + ("both domains" if how["data"] == "MIXED" else "pydoc"))
        lines.append([f"{float(ratio):.0%}", described, f"{row['reduction_ratio']:.2f}x", f"{row['in_domain']:.2f}",
                      f"{row['out_of_domain']:.2f}", f"{share:.0%}"])
    lines.append(["–", "full model + LoRA trained on it (baseline)", "1.00x", f"{baseline['in_domain']:.2f}",
                  f"{baseline['out_of_domain']:.2f}", "100%"])
    text = _report.table(["ratio", "alignment before training", "reduction", "in-domain ppl (stdlib-code)",
                          "out-of-domain ppl (pydoc)", "share of baseline gain"], lines)
    missing = [f"{r}/{a}" for r, a in CELLS if f"{r}/{a}" not in results]
    return text + (f"\n\nnot yet run: {', '.join(missing)}" if missing else "")


def write_report(results_path: Path, out_dir: Path) -> None:
    saved = json.loads(results_path.read_text())
    if "references" not in saved:
        raise SystemExit(f"{results_path} has no 'references' (the untouched model's and the baseline's perplexities "
                         "and the 50% rows, from a `loram run`, as in benchmarks/results/loram_cells.json); add them")
    cells, s = list(saved["cells"].values()), saved["settings"]
    command = (f"python benchmarks/loram.py --cells --steps {s['steps']} --align-steps {s['align_steps']} "
               f"--max-windows {s['max_windows']}")
    _report.write_page("loram", [_report.relative(results_path)], [_report.section(
        "The recovered adapter on the full model, by ratio and alignment",
        _report.provenance(command, [c.get("machine") for c in cells], [c.get("date") for c in cells],
                           [c.get("torch") for c in cells]),
        f"Taylor `stru` pruning, layers `paper`; the adapter trains {s['steps']} steps on builtin:stdlib-code "
        f"({' '.join(s['batch'])}), is recovered onto the full model and evaluated there on {s['max_windows']} "
        "held-out windows of 256 tokens. The share is of the baseline's in-domain gain. The 50% rows and the two "
        f"references: {saved['references']['source']}.", cells_report(saved))], out_dir)


def print_table(rows: dict, baseline: dict, untouched: dict) -> None:
    gain = untouched["in_domain"] - baseline["in_domain"]
    print("\n| configuration | in-domain ppl (stdlib-code) | out-of-domain ppl (pydoc) | share of baseline gain | "
          "training peak GiB | memory vs baseline | training s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        share = (untouched["in_domain"] - r["in_domain"]) / gain
        memory = r.get("peak_memory_bytes")
        print(f"| {name} | {r['in_domain']:.3f} | {r['out_of_domain']:.3f} | {share:.0%} | "
              + (f"{memory / 2**30:.2f} | {memory / baseline['peak_memory_bytes']:.0%} | {r['train_seconds']:.0f} |"
                 if memory else "– | – | – |"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--align-steps", type=int, default=100)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("runs/loram-bench"))
    parser.add_argument("--qloram-only", action="store_true", help="only the NF4 adapter against the baseline")
    parser.add_argument("--memory-only", type=int, default=0, metavar="N",
                        help="only the three training peaks, after N steps each")
    parser.add_argument("--cells", action="store_true",
                        help="the 20%% and 35%% cells (with and without alignment, and alignment variants at 35%%)")
    parser.add_argument("--only", nargs="+", metavar="CELL",
                        help="with --cells: only these cells (e.g. 0.35/aligned), so two workers can split the table; "
                             "cells of one ratio share its pruned model, so give a ratio's cells to one worker first")
    parser.add_argument("--results", type=Path, default=CELL_RESULTS, help="where --cells keeps finished cells")
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        write_report(args.results, args.out_dir)
        return
    if args.cells:
        cells(args)
        return
    run = args.out / "loram50"
    if args.memory_only:
        memory_only(args, run)
        return
    if args.qloram_only:
        qloram_only(args, run)
        return
    if not (run / "prunetune.json").exists():
        prunetune("loram", "run", "smollm2-135m", "--ratio", "0.5", "--method", "stru", "--align-data", "builtin:pydoc",
                  "--align-steps", args.align_steps, "--align-lr", "1e-4", "--align-next-token",
                  "--data", "builtin:stdlib-code",
                  "--steps", args.steps, "--lr", "5e-4", *COMMON, "--max-windows", args.max_windows,
                  "--baseline", "--ablation", "--out", run)
    qlora = train_nf4(args, run / "aligned")
    record = json.loads((run / "prunetune.json").read_text())
    rows = {r["configuration"]: r for r in record["comparison"]}
    q = json.loads((qlora / "prunetune.json").read_text())
    rows["full model + recovered QLoRAM (NF4) adapter"] = evaluate("smollm2-135m", args.out / "qloram-full-adapter",
                                                                  args.max_windows) | {
        "peak_memory_bytes": q["training"]["peak_memory_bytes"], "train_seconds": q["training"]["seconds"]}
    untouched = rows["full model, untouched"]
    baseline = rows["full model + LoRA trained on it (baseline)"]
    gain = untouched["in_domain"] - baseline["in_domain"]
    print_table(rows, baseline, untouched)
    print(f"\nparameter reduction ratio: {record['reduction_ratio']:.2f}x (16-bit), "
          f"{q['parameters']['reduction_ratio']:.2f}x (NF4)")
    loram = rows["full model + recovered LoRAM adapter"]
    checks = [
        ("recovered adapter gains >= 80% of the baseline's improvement",
         (untouched["in_domain"] - loram["in_domain"]) >= 0.8 * gain),
        ("LoRAM training peak memory <= 60% of the baseline's",
         loram["peak_memory_bytes"] <= 0.6 * baseline["peak_memory_bytes"]),
        ("QLoRAM training peak memory <= 35% of the baseline's",
         q["training"]["peak_memory_bytes"] <= 0.35 * baseline["peak_memory_bytes"]),
        ("without recovery is worse", rows["pruned model + its adapter (without recovery)"]["in_domain"]
         > loram["in_domain"]),
        ("without alignment is worse", rows["full model + recovered adapter trained without alignment"]["in_domain"]
         > loram["in_domain"]),
    ]
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'} {name}")


if __name__ == "__main__":
    main()
