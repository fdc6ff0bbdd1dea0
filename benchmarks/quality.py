"""Quality at equal training budgets: LoRAPrune against Taylor and magnitude with LoRA recovery.

Prunes the real SmolLM2-135M at 20% and 50% with
  - loraprune            (pruning while LoRA trains for STEPS steps)
  - taylor + recovery    (LLM-Pruner's first-order criterion, then STEPS LoRA steps)
  - magnitude + recovery (weight norms, then STEPS LoRA steps)
on the same training data, layers, batch and learning rate, and prints held-out perplexity,
parameters and wall time per method. Each run is a separate `prunetune prune` process, so wall time
and peak memory (process peak RSS on the CPU, which includes loading the GGUF) are the method's own.

    python benchmarks/quality.py [--steps 100] [--out runs/quality]

The README's table comes from this script; it writes `quality.md` and `quality.json` in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

METHODS = [("loraprune", []), ("taylor", ["--recover-steps"]), ("magnitude", ["--recover-steps"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--data", default="builtin:pydoc")
    parser.add_argument("--eval-data", default="builtin:pydoc")
    parser.add_argument("--layers", default="paper", help="the same layers for every method")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--reuse", action="store_true", help="keep runs whose output already exists (rerun only the missing ones)")
    args = parser.parse_args()

    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method, budget_flag in METHODS:
            out = args.out / f"{method}-{int(ratio * 100)}"
            command = [
                sys.executable, "-m", "prunetune.cli", "prune", args.model, "--method", method,
                "--ratio", str(ratio), "--layers", args.layers, "--data", args.data, "--eval-data", args.eval_data,
                "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr),
                "--out", str(out), "--overwrite",
                *(budget_flag + [str(args.steps)] if budget_flag else ["--steps", str(args.steps)]),
            ]
            if not (args.reuse and (out / "prunetune.json").exists()):
                print("$", " ".join(command[2:]), flush=True)
                subprocess.run(command, check=True)
            record = json.loads((out / "prunetune.json").read_text())
            results, params = record["results"], record["parameters"]
            rows.append({
                "ratio": ratio,
                "method": method if method == "loraprune" else f"{method} + recovery",
                "perplexity": results["perplexity_after"]["perplexity"],
                "perplexity_before": results["perplexity_before"]["perplexity"],
                "parameters": params["after"]["total"],
                "ratio_achieved": params["ratio_achieved"],
                "train_seconds": record["training"]["seconds"],
                "peak_memory_gib": record["training"]["peak_memory_bytes"] / 2**30,
                "wall_seconds": record["elapsed_seconds"],  # load, evaluate twice, train, cut, save
                "protocol": results["perplexity_after"]["protocol"],
            })

    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, " \
              f"{record['device']}, torch {record['torch']}"
    header = (f"SmolLM2-135M ({args.model}), {args.steps} training steps for every method "
              f"(batch {args.batch_size} x {args.seq_len} tokens of {args.data}, lr {args.lr}, layers '{args.layers}'); "
              f"machine: {machine}")
    lines = [header, "", "| ratio | method | held-out perplexity | parameters | achieved ratio | train s | wall s | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:.0%} | {r['method']} | {r['perplexity']:.2f} | {r['parameters']:,} | "
                     f"{r['ratio_achieved']:.3f} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} | {r['peak_memory_gib']:.2f} |")
    lines += ["", f"Unpruned: perplexity {rows[0]['perplexity_before']:.2f}. Protocol: {rows[0]['protocol']}."]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text(table + "\n")
    (args.out / "quality.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                        "machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
