"""The planner on the papers' models: LoRAM's and LoRAPrune's memory claims at the sizes they were made.

`prunetune plan` for each configuration below (no weights: the steps run on the meta device), one
process, bf16 weights, LoRA r=8 in fp32 as PEFT makes it, written to benchmarks/results/plan_papers.json.

LoRAM's code (junzhang-zj/LoRAM, loram/2_pruned_low_rank_matrix_training.py) trains with micro-batch
4 x 512 tokens, no gradient checkpointing, NF4 with double quantization for QLoRAM, and prunes layers
4-77 of LLaMA-3.1-70B at ratio 0.85. LoRAPrune's configurations are planned at batch 1 x 512.

    python benchmarks/plan_papers.py
"""

from __future__ import annotations

import json
from pathlib import Path

from prunetune.plan import PlanSettings, plan_method, resolve_config

HERE = Path(__file__).resolve().parent
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
    ("LLaMA-7B LoRAPrune step, 8-bit base", "llama-7b", dict(method="loraprune", quant="8bit", batch_size=1, seq_len=512)),
    ("LLaMA-65B LoRAPrune step, 8-bit base", "llama-65b",
     dict(method="loraprune", quant="8bit", batch_size=1, seq_len=512, gradient_checkpointing=True)),
]


def main() -> None:
    rows = []
    for label, shape, settings in RUNS:
        plan = plan_method(resolve_config(f"shape:{shape}"), PlanSettings(**settings))
        step = plan["steps"][plan["peak_step"]]
        rows.append({"label": label, "shape": shape, "settings": settings, "peak": plan["peak"],
                     "peak_step": plan["peak_step"], "parts": {k: v for k, v in step.items() if k != "notes"}})
        print(f"{label:50} {plan['peak'] / 2**30:8.2f} GiB ({plan['peak_step']})", flush=True)
    (HERE / "results" / "plan_papers.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
