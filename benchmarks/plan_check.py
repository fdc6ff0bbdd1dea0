"""The memory planner against measurement: `prunetune plan`'s peak beside the peak the method really
reaches on random weights of the same shape.

For each shape, method, checkpointing setting and batch size, the plan (the method's steps on the
meta device) and the measurement (the same steps on this machine: tensor memory on the CPU,
`torch.cuda.max_memory_allocated` on a GPU) of one process. Target (issue 17): every plan within 10%
of its measurement.

    python benchmarks/plan_check.py [--seq-len 64] [--json benchmarks/results/plan_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from prunetune.bench.shapes import shape_config
from prunetune.plan import PlanSettings, plan_method
from prunetune.plan.measure import measure_method

HERE = Path(__file__).resolve().parent
# Two random-weight shapes that fit here, and SmolLM2-135M's own.
SHAPES = {
    "smollm2-135m": lambda seq: shape_config("smollm2-135m", seq),
    "llama-7b/8 (4 layers, vocab 4096)": lambda seq: shape_config(
        "llama-7b", seq, hidden_size=512, intermediate_size=1376, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=4, vocab_size=4096),
    "qwen2.5-7b/7 (4 layers, vocab 4096)": lambda seq: shape_config(
        "qwen2.5-7b", seq, hidden_size=512, intermediate_size=2688, num_attention_heads=4, num_key_value_heads=1,
        num_hidden_layers=4, vocab_size=4096),
}
QUICK = {"tiny": lambda seq: shape_config("tiny", seq)}  # --quick: a check of the script itself
METHODS = ("lora", "loraprune", "taylor", "loram", "qloram", "train")
TARGET = 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--json", default=str(HERE / "results" / "plan_check.json"))
    parser.add_argument("--quick", action="store_true", help="the tiny shape only (checks the script)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = "bfloat16" if gpu else "float32"
    rows = []
    for shape, make in (QUICK if args.quick else SHAPES).items():
        config = make(args.seq_len)
        for method in METHODS:
            for checkpointing in (False, True):
                for batch in (int(b) for b in args.batch_sizes.split(",")):
                    settings = PlanSettings(method=method, batch_size=batch, seq_len=args.seq_len, dtype=dtype,
                                            gradient_checkpointing=checkpointing)
                    started = time.perf_counter()
                    plan = plan_method(config, settings)
                    plan_seconds = time.perf_counter() - started
                    measured = measure_method(config, settings, device)
                    for step, value in measured.items():
                        planned = plan["steps"][step]["peak"]
                        rows.append({"shape": shape, "method": method, "step": step, "checkpointing": checkpointing,
                                     "batch_size": batch, "planned": planned, "measured": value,
                                     "error": (planned - value) / value, "plan_seconds": round(plan_seconds, 2)})
                        print(f"{shape:36} {method:9} {step:8} ckpt {'on ' if checkpointing else 'off'} batch {batch}: "
                              f"plan {planned / 2**20:9.2f} MiB, measured {value / 2**20:9.2f} MiB, "
                              f"{rows[-1]['error']:+.2%}", flush=True)
    worst = max(rows, key=lambda r: abs(r["error"]))
    met = abs(worst["error"]) <= TARGET
    print(f"largest error {worst['error']:+.2%} ({worst['shape']}, {worst['method']}); target within "
          f"{TARGET:.0%}: {'met' if met else 'missed'}")
    Path(args.json).write_text(json.dumps({
        "machine": (torch.cuda.get_device_name() if gpu else f"{platform.machine()}, {os.cpu_count()} CPU cores")
                   + f", torch {torch.__version__}",
        "measure": "torch.cuda.max_memory_allocated" if gpu else "peak live tensor memory (CPU)",
        "settings": vars(args) | {"dtype": dtype, "plan": asdict(PlanSettings())}, "rows": rows,
        "largest_error": worst["error"], "target": TARGET, "met": met}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
