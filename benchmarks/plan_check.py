"""The memory planner against measurement: `prunetune plan`'s peak beside the peak the method really
reaches on random weights of the same shape.

For each shape, method, checkpointing setting and batch size, the plan (the method's steps on the
meta device) and the measurement (the same steps on this machine: tensor memory on the CPU,
`torch.cuda.max_memory_allocated` on a GPU) of one process. Target (issue 17): every plan within 10%
of its measurement.

    python benchmarks/plan_check.py [--seq-len 64] [--json benchmarks/results/plan_check.json]
    python benchmarks/plan_check.py --report    # docs/results/plan_check.md from the committed results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "plan_check.json"
METHODS = ("lora", "loraprune", "taylor", "loram", "qloram", "train")
TARGET = 0.10


def shapes(quick: bool) -> dict:
    """Two random-weight shapes that fit here, and SmolLM2-135M's own; --quick: the tiny shape only."""
    from prunetune.bench.shapes import shape_config

    if quick:  # a check of the script itself
        return {"tiny": lambda seq: shape_config("tiny", seq)}
    return {
        "smollm2-135m": lambda seq: shape_config("smollm2-135m", seq),
        "llama-7b/8 (4 layers, vocab 4096)": lambda seq: shape_config(
            "llama-7b", seq, hidden_size=512, intermediate_size=1376, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=4, vocab_size=4096),
        "qwen2.5-7b/7 (4 layers, vocab 4096)": lambda seq: shape_config(
            "qwen2.5-7b", seq, hidden_size=512, intermediate_size=2688, num_attention_heads=4, num_key_value_heads=1,
            num_hidden_layers=4, vocab_size=4096),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="the tiny shape only (checks the script)")
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        return report(json.loads(RESULTS.read_text()), args.out_dir)

    from dataclasses import asdict

    import torch

    from prunetune.plan import PlanSettings, plan_method
    from prunetune.plan.measure import measure_method

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = "bfloat16" if gpu else "float32"
    rows = []
    for shape, make in shapes(args.quick).items():
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
        "command": _report.invocation("plan_check"),
        "machine": (f"{torch.cuda.get_device_name()}, " if gpu else "") + _report.machine(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "measure": "torch.cuda.max_memory_allocated" if gpu else "peak live tensor memory (CPU)",
        "settings": {"seq_len": args.seq_len, "batch_sizes": args.batch_sizes, "quick": args.quick, "dtype": dtype,
                     "plan": asdict(PlanSettings())}, "rows": rows,
        "largest_error": worst["error"], "target": TARGET, "met": met}, indent=1))
    print(f"wrote {args.json}")


def report(results: dict, out_dir: Path) -> None:
    """Every plan beside its measurement, and the largest error against the target."""
    rows = results["rows"]
    worst = max(rows, key=lambda r: abs(r["error"]))
    measured = [r["measured"] for r in rows]
    summary = (f"{len(rows)} comparisons, measured peaks from {min(measured) / 2**20:,.0f} MiB to "
               f"{max(measured) / 2**30:.1f} GiB; the largest error **{worst['error']:+.2%}** ({worst['shape']}, "
               f"{worst['method']}); target: every plan within {results['target']:.0%} of its measurement: "
               f"{'met' if results['met'] else 'missed'}.")
    table = _report.table(
        ["shape", "method", "step", "checkpointing", "batch", "planned MiB", "measured MiB", "error"],
        [[r["shape"], r["method"], r["step"], "on" if r["checkpointing"] else "off",
          f"{r['batch_size']} x {results['settings']['seq_len']}", f"{r['planned'] / 2**20:,.2f}",
          f"{r['measured'] / 2**20:,.2f}", f"{r['error']:+.3%}"] for r in rows])
    _report.write_page("plan_check", [_report.relative(RESULTS)], [_report.section(
        "Planned against measured peak memory, one process",
        _report.provenance(results["command"], results["machine"], results["date"], results.get("torch")),
        f"Random weights in {results['settings']['dtype']}; measured: {results['measure']}. " + summary, table)],
        out_dir)


if __name__ == "__main__":
    main()
