"""What counting tensor memory costs a CPU training run: every step counted, the first two, none.

The CPU stand-in for `torch.cuda.max_memory_allocated` watches every operator (a TorchDispatchMode),
which slows each step it watches. `train()` therefore counts the first two steps only, where the peak
is reached (tests/training/test_train_memory.py: the same peak as counting every step). This times six
LoRAPrune steps (real SmolLM2-135M, LoRA, masks moving from the first step, batch 4 x 128, the
issue's measurement) with the count on every step, on the first two (the default) and off, in
alternation (A B C A B C ...) so that a drifting machine hits all three alike; medians and each
mode's time over the uncounted run's.

    python benchmarks/count_cost.py [--steps 6] [--repeats 3] [--json benchmarks/results/count_cost.json]
    python benchmarks/count_cost.py --report     # docs/results/count_cost.md from the committed results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

RESULTS = Path(__file__).resolve().parent / "results" / "count_cost.json"


def one_run(memory_steps: int | None, args) -> dict:
    from distill_cost import loraprune_setup  # the same LoRAPrune set-up (benchmarks/ is the script's directory)

    from prunetune.training.loop import TrainSettings, train
    from prunetune.training.rates import LORA_LR

    model, pruner, blocks, mask = loraprune_setup(args.model, args.seq_len, args.steps)
    run = train(model, blocks, mask, TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                                   lr=LORA_LR),
                hooks=pruner, progress=False, memory_steps=memory_steps)
    return {"seconds": run.seconds, "peak_memory_bytes": run.peak_memory_bytes, "kind": run.peak_memory_kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        return report(json.loads(RESULTS.read_text()), args.out_dir)

    import torch

    from prunetune.training.loop import MEMORY_STEPS

    modes = {"every step": None, f"first {MEMORY_STEPS} steps (default)": MEMORY_STEPS, "off": 0}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode, memory_steps in modes.items():
            runs[mode].append(one_run(memory_steps, args))
            print(f"repeat {repeat + 1}, {mode}: {runs[mode][-1]['seconds']:.1f} s")
    off = [r["seconds"] for r in runs["off"]]
    summary = {}
    print(f"{_report.machine()}, torch {torch.__version__}; {args.steps} LoRAPrune steps at batch {args.batch_size} x "
          f"{args.seq_len}, {args.repeats} runs of each, alternating")
    for mode, mode_runs in runs.items():
        seconds = [r["seconds"] for r in mode_runs]
        ratios = [s / o for s, o in zip(seconds, off)]
        summary[mode] = {"median_seconds": statistics.median(seconds), "median_ratio_to_off": statistics.median(ratios),
                         "peak_memory_bytes": mode_runs[0]["peak_memory_bytes"],
                         "peak_memory_kind": mode_runs[0]["kind"]}
        print(f"{mode:>26}: median {summary[mode]['median_seconds']:.1f} s, "
              f"{summary[mode]['median_ratio_to_off']:.2f}x "
              f"the uncounted run; peak {mode_runs[0]['peak_memory_bytes'] / 2**20:.0f} MiB ({mode_runs[0]['kind']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": _report.invocation("count_cost"), "machine": _report.machine(),
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                       "settings": {k: v for k, v in vars(args).items() if k not in ("json", "report", "out_dir")},
                       "modes": summary}, f, indent=1)


def report(results: dict, out_dir: Path) -> None:
    s = results["settings"]
    rows = [[mode, f"{m['median_seconds']:.1f}", f"{m['median_ratio_to_off']:.2f}x",
             f"{m['peak_memory_bytes'] / 2**20:,.0f}", m["peak_memory_kind"]] for mode, m in results["modes"].items()]
    _report.write_page("count_cost", [_report.relative(RESULTS)], [_report.section(
        "Time and peak memory by what is counted",
        _report.provenance(results["command"], results["machine"], results["date"], results.get("torch")),
        f"{s['steps']} LoRAPrune steps on {s['model']} at batch {s['batch_size']} x {s['seq_len']}; {s['repeats']} "
        "runs of each mode, alternating; medians.",
        _report.table(["tensor memory counted", "median s", "vs uncounted", "peak MiB", "peak of"], rows))], out_dir)


if __name__ == "__main__":
    main()
