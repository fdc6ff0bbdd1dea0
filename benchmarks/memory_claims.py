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
    python benchmarks/memory_claims.py --report    # docs/results/memory_claims.md from the committed results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "memory_claims.json"
LORAM_SHAPE = dict(shape="llama2-13b", num_hidden_layers=3, vocab_size=1024)  # 3 of 40 layers
LORAPRUNE_SHAPE = dict(shape="llama-7b", num_hidden_layers=4, vocab_size=1024)  # 4 of 32 layers
TARGETS = {"loram": 0.60, "qloram": 0.35, "lora-guided": 0.45, "lora-guided-8bit": 0.30}
NAMES = {"llama2-13b": "LLaMA-2-13B", "llama-7b": "LLaMA-7B"}


def config_of(spec: dict, seq_len: int):
    from prunetune.bench.shapes import shape_config

    spec = dict(spec)
    return shape_config(spec.pop("shape"), seq_len, **spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", default=str(RESULTS))
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        return report(json.loads(RESULTS.read_text()), args.out_dir)

    import torch

    from prunetune.plan import PlanSettings, plan_method
    from prunetune.plan.measure import measure_criterion_step, measure_method

    result = {"command": _report.invocation("memory_claims"), "machine": _report.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"),
              "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "loram_shape": LORAM_SHAPE,
                           "loraprune_shape": LORAPRUNE_SHAPE, "dtype": "bfloat16"}}

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


def report(results: dict, out_dir: Path) -> None:
    """The table of docs/results/memory_claims.md: each claim's measured share beside the plan's and the target."""
    s, loram, criterion, targets = results["settings"], results["loram"], results["criterion"], results["targets"]

    def shape(spec: dict) -> str:
        return (f"{NAMES.get(spec['shape'], spec['shape'])}'s layers, {spec['num_hidden_layers']} of them, "
                f"vocabulary {spec['vocab_size']:,}")

    def measured(part: int, whole: int, share: float) -> str:
        return f"{part / 2**20:,.0f} / {whole / 2**20:,.0f} MiB = **{share:.1%}**"

    def target(key: str, share: float) -> str:
        return f"at most {targets[key]:.0%}: {'met' if share <= targets[key] else 'missed'}"

    lora, taylor = loram["lora"]["measured"], criterion["taylor"]["measured"]
    rows = [
        ["LoRAM-Stru 50% (every layer) against LoRA, two training steps", shape(s["loram_shape"]),
         measured(loram["loram"]["measured"], lora, loram["loram"]["measured_vs_lora"]),
         f"{loram['loram']['planned_vs_lora']:.1%}", target("loram", loram["loram"]["measured_vs_lora"])],
        ["QLoRAM-Stru 50% (NF4) against LoRA", "the same",
         measured(loram["qloram"]["measured"], lora, loram["qloram"]["measured_vs_lora"]),
         f"{loram['qloram']['planned_vs_lora']:.1%}", target("qloram", loram["qloram"]["measured_vs_lora"])],
        ["a LoRA-guided scoring step against vanilla Taylor's", shape(s["loraprune_shape"]),
         measured(criterion["lora-guided"]["measured"], taylor, criterion["lora-guided"]["vs_taylor"]), "",
         target("lora-guided", criterion["lora-guided"]["vs_taylor"])],
        ["the same on an 8-bit base", "the same",
         measured(criterion["lora-guided-8bit"]["measured"], taylor, criterion["lora-guided-8bit"]["vs_taylor"]), "",
         target("lora-guided-8bit", criterion["lora-guided-8bit"]["vs_taylor"])],
    ]
    _report.write_page("memory_claims", [_report.relative(RESULTS)], [_report.section(
        "Measured peaks against the papers' claims",
        _report.provenance(results["command"], results["machine"], results["date"], results.get("torch")),
        f"Random weights in {s['dtype']}, peak live tensor memory on the CPU (the stand-in for "
        f"`torch.cuda.max_memory_allocated`), batch {s['batch_size']} x {s['seq_len']}.",
        _report.table(["claim", "shape", "measured", "planned", "target"], rows))], out_dir)


if __name__ == "__main__":
    main()
