"""The planner on the papers' models: LoRAM's and LoRAPrune's memory claims at the sizes they were made.

`prunetune plan` for each configuration below (no weights: the steps run on the meta device), one
process, bf16 weights, LoRA r=8 in fp32 as PEFT makes it, written to benchmarks/results/plan_papers.json.

LoRAM's code (junzhang-zj/LoRAM, loram/2_pruned_low_rank_matrix_training.py) trains with micro-batch
4 x 512 tokens, no gradient checkpointing, NF4 with double quantization for QLoRAM, and prunes layers
4-77 of LLaMA-3.1-70B at ratio 0.85. LoRAPrune's configurations are planned at batch 1 x 512.

    python benchmarks/plan_papers.py
    python benchmarks/plan_papers.py --report    # docs/results/plan_papers.md from the committed results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "plan_papers.json"
RUNS = [
    # (label, shape, settings)
    ("LLaMA-2-13B LoRA", "llama2-13b", dict(method="lora", batch_size=4, seq_len=512)),
    ("LLaMA-2-13B LoRAM-Stru 0.5", "llama2-13b", dict(method="loram", ratio=0.5, batch_size=4, seq_len=512)),
    ("LLaMA-2-13B QLoRAM-Stru 0.5", "llama2-13b", dict(method="qloram", ratio=0.5, batch_size=4, seq_len=512)),
    ("LLaMA-3.1-70B LoRA", "llama3.1-70b", dict(method="lora", batch_size=4, seq_len=512)),
    ("LLaMA-3.1-70B QLoRAM-Stru 0.85", "llama3.1-70b",
     dict(method="qloram", ratio=0.85, layers="4-77", batch_size=4, seq_len=512)),
    ("LLaMA-3.1-70B QLoRAM-Stru 0.85, checkpointing", "llama3.1-70b",
     dict(method="qloram", ratio=0.85, layers="4-77", batch_size=4, seq_len=512, gradient_checkpointing=True)),
    ("LLaMA-7B vanilla Taylor scoring", "llama-7b", dict(method="taylor", batch_size=1, seq_len=512)),
    ("LLaMA-7B LoRAPrune step", "llama-7b", dict(method="loraprune", batch_size=1, seq_len=512)),
    ("LLaMA-7B LoRAPrune step, 8-bit base", "llama-7b",
     dict(method="loraprune", quant="8bit", batch_size=1, seq_len=512)),
    ("LLaMA-65B LoRAPrune step, 8-bit base", "llama-65b",
     dict(method="loraprune", quant="8bit", batch_size=1, seq_len=512, gradient_checkpointing=True)),
]
# The report's comparisons: a configuration's planned peak as a share of another's, and what the paper says.
AGAINST = {"LLaMA-2-13B LoRAM-Stru 0.5": "LLaMA-2-13B LoRA", "LLaMA-2-13B QLoRAM-Stru 0.5": "LLaMA-2-13B LoRA",
           "LLaMA-7B LoRAPrune step": "LLaMA-7B vanilla Taylor scoring",
           "LLaMA-7B LoRAPrune step, 8-bit base": "LLaMA-7B vanilla Taylor scoring"}
PAPER = {"LLaMA-3.1-70B QLoRAM-Stru 0.85": "trained on a 20 GB GPU",
         "LLaMA-7B LoRAPrune step": "52.6% lighter criterion", "LLaMA-7B LoRAPrune step, 8-bit base": "64.2% lighter",
         "LLaMA-65B LoRAPrune step, 8-bit base": "pruned on one GPU"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        return report(json.loads(RESULTS.read_text()), args.out_dir)

    import torch

    from prunetune.plan import PlanSettings, plan_method, resolve_config

    rows = []
    for label, shape, settings in RUNS:
        plan = plan_method(resolve_config(f"shape:{shape}"), PlanSettings(**settings))
        step = plan["steps"][plan["peak_step"]]
        rows.append({"label": label, "shape": shape, "settings": settings, "peak": plan["peak"],
                     "peak_step": plan["peak_step"], "parts": {k: v for k, v in step.items() if k != "notes"}})
        print(f"{label:50} {plan['peak'] / 2**30:8.2f} GiB ({plan['peak_step']})", flush=True)
    RESULTS.write_text(json.dumps({"command": _report.invocation("plan_papers"), "machine": _report.machine(),
                                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                  indent=1))


def report(results: dict, out_dir: Path) -> None:
    peaks = {r["label"]: r["peak"] for r in results["rows"]}
    rows = []
    for r in results["rows"]:
        s = r["settings"]
        against = AGAINST.get(r["label"])
        rows.append([r["label"], s.get("layers", ""), f"{s['batch_size']} x {s['seq_len']}",
                     "on" if s.get("gradient_checkpointing") else "off", f"{r['peak'] / 2**30:.2f}",
                     f"{r['peak'] / peaks[against]:.0%} of {against}" if against else "", PAPER.get(r["label"], "")])
    _report.write_page("plan_papers", [_report.relative(RESULTS)], [_report.section(
        "Planned peak training memory of the papers' configurations",
        _report.provenance(results["command"], results["machine"], results["date"], results.get("torch")),
        "`prunetune plan` on the meta device (no weights), one process, bf16 weights, LoRA r=8 in fp32; the "
        "planned peak of the step that peaks. Pruned layers are `paper`'s (the first 10% and the last layer kept) "
        "unless the layers column names them.",
        _report.table(["configuration", "pruned layers", "batch", "checkpointing", "planned peak GiB", "against",
                       "the paper"], rows))], out_dir)


if __name__ == "__main__":
    main()
