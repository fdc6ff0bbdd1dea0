"""LoRAM's and LoRAPrune's memory claims, measured where they can hold: on random-weight models whose
transformer weights dominate (the papers' layer shapes, fewer layers, a small vocabulary), in bf16,
peak live tensor memory on the CPU (the stand-in for `torch.cuda.max_memory_allocated`), beside what
`prunetune plan` says for the same runs and for the papers' whole models.

LoRAM (issue 17, item 4): LoRA on the full model against LoRA on the model pruned 50% (LoRAM-Stru)
and on that model in NF4 (QLoRAM-Stru), two training steps each. Targets: LoRAM at most 60% of
LoRA's peak, QLoRAM at most 35%.

LoRAPrune (item 5): one scoring step of vanilla Taylor (weight gradients) against a LoRA-guided
step, and one on an 8-bit base. Targets: at most 45% of Taylor's peak (30% on an 8-bit base).

    python benchmarks/memory_claims.py [--json benchmarks/results/memory_claims.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from prunetune.bench.shapes import shape_config
from prunetune.plan import PlanSettings, plan_method
from prunetune.plan.measure import measure_criterion_step, measure_method

HERE = Path(__file__).resolve().parent
LORAM_SHAPE = dict(shape="llama2-13b", num_hidden_layers=3, vocab_size=1024)  # 3 of 40 layers
LORAPRUNE_SHAPE = dict(shape="llama-7b", num_hidden_layers=4, vocab_size=1024)  # 4 of 32 layers
TARGETS = {"loram": 0.60, "qloram": 0.35, "lora-guided": 0.45, "lora-guided-8bit": 0.30}


def config_of(spec: dict, seq_len: int):
    spec = dict(spec)
    return shape_config(spec.pop("shape"), seq_len, **spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", default=str(HERE / "results" / "memory_claims.json"))
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
              "settings": vars(args) | {"loram_shape": LORAM_SHAPE, "loraprune_shape": LORAPRUNE_SHAPE,
                                        "dtype": "bfloat16"}}

    config = config_of(LORAM_SHAPE, args.seq_len)
    loram = {}
    for method in ("lora", "loram", "qloram"):
        settings = PlanSettings(method=method, ratio=0.5, layers="all", batch_size=args.batch_size,
                                seq_len=args.seq_len, dtype="bfloat16")
        measured = measure_method(config, settings)["training"]
        planned = plan_method(config, settings)["peak"]
        loram[method] = {"measured": measured, "planned": planned}
        print(f"LoRAM shape, {method}: measured {measured / 2**20:,.0f} MiB, planned {planned / 2**20:,.0f} MiB",
              flush=True)
    for method in ("loram", "qloram"):
        for key in ("measured", "planned"):
            loram[method][f"{key}_vs_lora"] = loram[method][key] / loram["lora"][key]
        ratio = loram[method]["measured_vs_lora"]
        print(f"{method} / LoRA: measured {ratio:.1%} (target at most {TARGETS[method]:.0%}: "
              f"{'met' if ratio <= TARGETS[method] else 'missed'}), planned {loram[method]['planned_vs_lora']:.1%}")
    result["loram"] = loram

    config = config_of(LORAPRUNE_SHAPE, args.seq_len)
    criterion = {}
    for variant in ("taylor", "lora-guided", "lora-guided-8bit"):
        criterion[variant] = {"measured": measure_criterion_step(config, variant, args.batch_size, args.seq_len)}
        print(f"LoRAPrune shape, {variant}: measured {criterion[variant]['measured'] / 2**20:,.0f} MiB", flush=True)
    for variant in ("lora-guided", "lora-guided-8bit"):
        ratio = criterion[variant]["measured"] / criterion["taylor"]["measured"]
        criterion[variant]["vs_taylor"] = ratio
        print(f"{variant} / Taylor: {ratio:.1%} (target at most {TARGETS[variant]:.0%}: "
              f"{'met' if ratio <= TARGETS[variant] else 'missed'})")
    result["criterion"] = criterion
    result["targets"] = TARGETS
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
