"""Criterion cost: one scoring step of vanilla Taylor against LoRA-guided (and LoRA-guided on an int8 base).

On a GPU: a randomly initialised LLaMA-7B-shaped model in bf16, batch 1 x 1024 tokens, measured
without and with gradient checkpointing, and checked against the targets (LoRA-guided at most 45%
of Taylor's peak memory and at least 1.5x as fast; int8 at most 30% of the memory). Without a GPU:
the SmolLM2-135M shape in fp32, batch 1 x 256, each variant in its own process (no targets: they
are GPU targets).

    python benchmarks/criterion.py [--shape llama-7b] [--seq-len 1024] [--json criterion.json]

Each run is what `prunetune bench-criterion --shape SHAPE --seq-len N [--gradient-checkpointing]` prints.

Nothing is downloaded: the weights are random; only shapes matter for time and memory.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from rich.console import Console

from prunetune.bench.criterion import SHAPES, BenchSettings, bench_criterion, result_notes, result_table


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-7b" if gpu else "smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024 if gpu else 256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", choices=("both", "off", "on"), default="both" if gpu else "off",
                        help="gradient checkpointing: run without it, with it, or both")
    parser.add_argument("--json", help="write every run's numbers to this file")
    args = parser.parse_args()

    console = Console(width=110)
    base = BenchSettings(shape=args.shape, batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats)
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    records = []
    for checkpointing in modes:
        result = bench_criterion(replace(base, gradient_checkpointing=checkpointing),
                                 log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
        console.print(result_table(result))
        for line in result_notes(result):
            console.print(line)
        if gpu:
            for name, check in result.targets().items():
                value = "not run" if check["value"] is None else f"{check['value']:.2f}"
                verdict = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "-"}[check["met"]]
                console.print(f"target {name} {check['limit']}: {value} {verdict}")
        console.print()
        records.append(result)
    if len(records) == 2:  # LoRA with checkpointing against Taylor without: the cheapest way to each score
        plain, checkpointed = records
        taylor = plain.get("taylor")
        for variant in ("lora-guided", "lora-guided-8bit"):
            lora = checkpointed.get(variant)
            if taylor.skipped or lora is None or lora.skipped:
                continue
            console.print(f"{variant} with checkpointing vs taylor without: "
                          f"{lora.peak_memory_bytes / taylor.peak_memory_bytes:.0%} of the peak memory, "
                          f"{taylor.step_seconds / lora.step_seconds:.2f}x the speed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in records], f, indent=2)


if __name__ == "__main__":
    main()
