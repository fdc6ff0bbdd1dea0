"""What self-distillation costs a LoRAPrune step: peak memory and time, plain against distilled.

Both runs train the same LoRA on the real SmolLM2-135M with the same masks schedule (50%, masks from
the first step on) for a few steps; the distilled run adds the teacher's pass (the same model, masks
suspended, adapters off) and the chunked KL. Peak memory is the training's peak of live tensors
(`torch.cuda.max_memory_allocated` on a GPU), the measure the target (at most 1.1x) is about.

    python benchmarks/distill_cost.py [--steps 4] [--batch-size 4] [--seq-len 128] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from prunetune import load_model
from prunetune.data import load_blocks
from prunetune.training.distill import DistillSettings, self_teacher_for
from prunetune.training.lora import LoraSettings, add_lora
from prunetune.methods.loraprune.pruner import LoRAPruneSettings, LoRAPruner
from prunetune.structure.allocate import parse_layers
from prunetune.structure.units import Structure
from prunetune.training.loop import TrainSettings, train
from prunetune.training.rates import LORA_LR


def loraprune_setup(model_spec: str, seq_len: int, steps: int):
    """The real model with LoRA and a LoRAPrune schedule at 50% whose masks move from the first step,
    and the pydoc training blocks: (model, pruner, blocks, mask). benchmarks/count_cost.py uses it too."""
    model, tokenizer = load_model(model_spec)
    structure = Structure.of(model)
    blocks, mask = load_blocks("builtin:pydoc", tokenizer, seq_len, default_split="train")
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings())
    pruner = LoRAPruner(model, structure, ratio=0.5, layers=parse_layers("paper", structure.num_layers),
                        units=("heads", "channels"), head_unit="kv-group", round_to="auto", allocation="uniform",
                        settings=LoRAPruneSettings(prune_every=1, warmup=0.0, cooldown=0.0), total_steps=steps)
    return model, pruner, blocks, mask


def one_run(distill: bool, args) -> dict:
    model, pruner, blocks, mask = loraprune_setup(args.model, args.seq_len, args.steps)
    settings = DistillSettings(enabled=True)
    teacher = self_teacher_for(model, pruner.masks_off, settings) if distill else None
    run = train(model, blocks, mask, TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                                   lr=LORA_LR, gradient_checkpointing=args.gradient_checkpointing),
                hooks=pruner, progress=False, teacher=teacher, distill=settings)
    return {"distill": distill, "seconds_per_step": run.seconds / args.steps,
            "peak_memory_bytes": run.peak_memory_bytes,
            "peak_memory_kind": run.peak_memory_kind, "teacher": run.distill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    plain, distilled = one_run(False, args), one_run(True, args)
    memory = distilled["peak_memory_bytes"] / plain["peak_memory_bytes"]
    time_ratio = distilled["seconds_per_step"] / plain["seconds_per_step"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; batch "
          f"{args.batch_size} x {args.seq_len}, {args.steps} steps, checkpointing {args.gradient_checkpointing}")
    for run in (plain, distilled):
        print(f"{'distilled' if run['distill'] else 'plain':>9}: {run['seconds_per_step']:.2f} s/step, "
              f"peak {run['peak_memory_bytes'] / 2**20:.0f} MiB ({run['peak_memory_kind']})")
    print(f"distilled / plain: peak memory {memory:.3f}x (target <= 1.1x), time {time_ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plain": plain, "distilled": distilled, "memory_ratio": memory, "time_ratio": time_ratio,
                       "settings": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
