"""Sheared-LLaMA on the real SmolLM2-135M: targeted pruning, continued training, dynamic batch loading.

    python benchmarks/sheared.py [--steps 120] [--shear-steps 80] [--official-start] [--settle-steps 300]
                                 [--out runs/sheared-bench]

1. LoRAPrune (the baseline) removes half of the prunable parameters of every layer while its LoRA
   trains for STEPS steps on builtin:pydoc; its result's shape becomes the shear target, so both
   methods end at the same size (about half of the non-embedding parameters).
2. `prunetune shear` to that shape for SHEAR_STEPS steps (the target warmed up over half of them),
   then `prunetune train` for the rest (full-parameter), on the same data: the same total number of
   training steps. With --official-start, the same shear again with `--lambda2-init 0` (the official
   code's start for the multipliers) shows what the stiff default changes in the masks' expected count.
3. From the sheared model, `prunetune train` on two domains (stdlib code and pydoc prose) for
   STEPS - SHEAR_STEPS steps, once with dynamic batch loading and once with the fixed initial mixture; the
   references are the source model's own per-domain losses (the paper's choice for a lone model).
4. With --settle-steps N: one more shear from the official start, for N steps, with the official 20%
   warm-up at a smaller batch (2 x 64 tokens, no evaluation), to see whether the official start
   lands within 1% when the Lagrangian has the steps to settle.

It prints the tables of docs/methods/sheared.md and checks the targets: the pruned model has exactly the requested
shape and the masks' expected parameter count is within 1% of the real one; the sheared-and-trained
model's held-out perplexity is at or below LoRAPrune's; dynamic loading leaves a smaller worst-domain
gap between validation loss and reference loss than the fixed mixture. Every run directory's
report.md has its plots (masks, domain weights, losses).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TRAIN = ["--batch-size", "4", "--seq-len", "128", "--gradient-checkpointing"]
EVAL = ["--eval-data", "builtin:pydoc", "--eval-seq-len", "256"]


def prunetune(*args) -> None:
    command = [sys.executable, "-m", "prunetune.cli", *map(str, args)]
    print("$ prunetune " + " ".join(map(str, args)), flush=True)
    done = subprocess.run(command, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", COLUMNS="120"))
    if done.returncode:
        sys.exit(done.returncode)


def record(run: Path) -> dict:
    return json.loads((run / "prunetune.json").read_text())


def once(run: Path, *args) -> dict:
    """Run a step unless its directory is complete (a re-run reuses finished steps)."""
    if not (run / "prunetune.json").exists():
        prunetune(*args, "--out", run, "--overwrite")
    return record(run)


def last_losses(rec: dict) -> dict[str, float]:
    evaluated = [h for h in rec["training"]["history"] if h.get("domain_losses")]
    return evaluated[-1]["domain_losses"]


def worst_gap(rec: dict) -> float:
    references = rec["data"]["reference_losses"]
    return max(loss - references[name] for name, loss in last_losses(rec).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="LoRAPrune's steps; shear and train share them")
    parser.add_argument("--shear-steps", type=int, default=80)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--settle-steps", type=int, default=0, help="also shear for this many steps (0: skip)")
    parser.add_argument("--official-start", action="store_true", help="also shear from λ1 = λ2 = 0")
    parser.add_argument("--out", type=Path, default=Path("runs/sheared-bench"))
    args = parser.parse_args()
    rest = args.steps - args.shear_steps
    windows = ["--max-windows", args.max_windows]

    lp = once(args.out / "loraprune", "prune", "smollm2-135m", "--method", "loraprune", "--ratio", "0.5",
              "--layers", "all", "--steps", args.steps, "--data", "builtin:pydoc", "--lr", "5e-4", *TRAIN, *EVAL,
              *windows)
    shape = lp["architecture"]["layer_shapes"][0]
    target = (f"layers={len(lp['architecture']['layer_shapes'])},heads={shape['num_heads']},"
              f"kv-heads={shape['num_kv_heads']},intermediate={shape['intermediate']}")
    shear = ["shear", "smollm2-135m", "--target", target, "--data", "prose=builtin:pydoc", "--steps", args.shear_steps,
             "--warmup-share", "0.5", "--lr", "1e-4", *TRAIN, *EVAL, *windows]
    sh = once(args.out / "shear", *shear)
    official = once(args.out / "shear-official-start", *shear, "--lambda2-init", "0") if args.official_start else None
    trained = once(args.out / "shear-trained", "train", args.out / "shear", "--data", "prose=builtin:pydoc",
                   "--steps", rest, "--lr", "1e-4", *TRAIN, *EVAL, *windows)
    two = ["--data", "code=builtin:stdlib-code,prose=builtin:pydoc", "--reference-model", "smollm2-135m",
           "--steps", rest, "--lr", "1e-4", "--eval-every", args.eval_every, *TRAIN, *EVAL, *windows]
    dynamic = once(args.out / "dynamic", "train", args.out / "shear", "--dynamic-loading", *two)
    fixed = once(args.out / "fixed", "train", args.out / "shear", "--fixed-mixture", *two)

    settle = None
    if args.settle_steps:
        settle = once(args.out / f"shear-{args.settle_steps}", "shear", "smollm2-135m", "--target", target,
                      "--data", "prose=builtin:pydoc", "--steps", args.settle_steps, "--warmup-share", "0.2",
                      "--batch-size", "2", "--seq-len", "64", "--no-eval", "--eval-every", args.settle_steps,
                      "--eval-blocks", "2", "--max-windows", "4", "--lambda2-init", "0")

    params = sh["parameters"]
    got = sh["architecture"]["layer_shapes"]
    exact = (len(got) == sh["target"]["layers"] and all(
        (s["num_heads"], s["num_kv_heads"], s["intermediate"]) == (sh["target"]["heads"], sh["target"]["kv_heads"],
                                                                  sh["target"]["intermediate"]) for s in got))
    print(f"\ntarget {sh['target']['spec']}: {params['after']['total']:,} parameters "
          f"({params['after']['non_embedding']:,} non-embedding, "
          f"{params['after']['non_embedding'] / params['before']['non_embedding']:.1%} "
          f"of the source's); masks expected {params['expected_by_masks']:,} ({params['expected_error']:+.2%})")
    if official is not None:
        print("from the official start (--lambda2-init 0): masks expected "
              f"{official['parameters']['expected_by_masks']:,} "
              f"({official['parameters']['expected_error']:+.2%})")

    def ppl(rec: dict, key: str = "perplexity_after") -> float:
        return rec["results"][key]["perplexity"]

    print("\n| model | steps | non-embedding parameters | pydoc held-out ppl | training s |")
    print("|---|---|---|---|---|")
    print(f"| SmolLM2-135M (source) | – | {lp['parameters']['before']['non_embedding']:,} | "
          f"{ppl(lp, 'perplexity_before'):.2f} | – |")
    print(f"| LoRAPrune 50% (LoRA, pruning while training) | {args.steps} | "
          f"{lp['parameters']['after']['non_embedding']:,} | {ppl(lp):.2f} | {lp['training']['seconds']:.0f} |")
    print(f"| Sheared: shear only | {args.shear_steps} | {params['after']['non_embedding']:,} | {ppl(sh):.2f} | "
          f"{sh['training']['seconds']:.0f} |")
    print(f"| Sheared: shear + continued training | {args.shear_steps} + {rest} | "
          f"{trained['parameters']['non_embedding']:,} | "
          f"{ppl(trained):.2f} | {sh['training']['seconds'] + trained['training']['seconds']:.0f} |")

    references = dynamic["data"]["reference_losses"]
    print(f"\n| {rest} steps from the sheared model | "
          + " | ".join(f"{n} loss (ref {references[n]:.3f})" for n in references)
          + " | worst gap | final weights |")
    print("|---|" + "---|" * (len(references) + 2))
    for name, rec in (("dynamic batch loading", dynamic), ("fixed initial mixture", fixed)):
        losses = last_losses(rec)
        weights = ", ".join(f"{n} {w:.2f}" for n, w in rec["data"]["final_weights"].items())
        print(f"| {name} | " + " | ".join(f"{losses[n]:.3f}" for n in references)
              + f" | {worst_gap(rec):+.3f} | {weights} |")

    checks = [
        ("the pruned model has exactly the target shape", exact),
        ("masks' expected parameter count within 1% of the real count", abs(params["expected_error"]) <= 0.01),
        ("sheared + trained held-out perplexity <= LoRAPrune's at the same steps", ppl(trained) <= ppl(lp)),
        ("dynamic loading: smaller worst-domain gap than the fixed mixture", worst_gap(dynamic) < worst_gap(fixed)),
    ]
    if settle is not None:
        error = settle["parameters"]["expected_error"]
        print(f"\nshear from the official start for {args.settle_steps} steps (batch 2 x 64, warm-up 20%): "
              f"masks expected {settle['parameters']['expected_by_masks']:,} of "
              f"{settle['parameters']['after']['total']:,} ({error:+.2%}), "
              f"{settle['training']['seconds']:.0f} s")
        checks.append((f"official start: masks' expected count within 1% after {args.settle_steps} steps",
                       abs(error) <= 0.01))
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'} {name}")


if __name__ == "__main__":
    main()
