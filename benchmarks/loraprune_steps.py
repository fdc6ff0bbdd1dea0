"""LoRAPrune's training speed: optimizer steps per second of a LoRAPrune run on a random model of a
named shape (LLaMA-7B by default, bf16 on a GPU), with the criterion every step, self-distillation
and masks moving, as `prunetune prune --method loraprune` trains; and the step's peak memory.

    python benchmarks/loraprune_steps.py [--shape llama-7b] [--steps 12] [--batch-size 1] [--seq-len 1024]
                                         [--gradient-checkpointing] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from prunetune.training.distill import DistillSettings, self_teacher_for
from prunetune.bench.shapes import random_model, shape_config
from prunetune.training.lora import LoraSettings, add_lora
from prunetune.methods.loraprune.pruner import LoRAPruneSettings, LoRAPruner
from prunetune.structure.allocate import parse_layers
from prunetune.structure.units import Structure
from prunetune.training.loop import TrainSettings, train
from prunetune.training.rates import LORA_LR


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-7b")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024 if gpu else 128)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    config = shape_config(args.shape, args.seq_len)
    model = random_model(config, device, torch.bfloat16 if gpu else torch.float32)
    structure = Structure.of(model)
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings())
    pruner = LoRAPruner(model, structure, ratio=0.5, layers=parse_layers("paper", structure.num_layers),
                        units=("heads", "channels"), head_unit="kv-group", round_to="auto", allocation="uniform",
                        settings=LoRAPruneSettings(prune_every=2, warmup=0.0, cooldown=0.5), total_steps=args.steps)
    distill = DistillSettings(enabled=True)
    blocks = torch.randint(0, config.vocab_size, (4 * args.steps * args.batch_size, args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=LORA_LR,
                             gradient_checkpointing=args.gradient_checkpointing)
    run = train(model, blocks, torch.ones_like(blocks, dtype=torch.bool), settings, hooks=pruner, progress=False,
                teacher=self_teacher_for(model, pruner.masks_off, distill), distill=distill)
    result = {"shape": args.shape, "device": torch.cuda.get_device_name() if gpu else "cpu",
              "dtype": "bfloat16" if gpu else "float32", "settings": vars(args),
              "steps_per_second": args.steps / run.seconds, "seconds": run.seconds,
              "peak_memory_bytes": run.peak_memory_bytes, "peak_memory_kind": run.peak_memory_kind}
    print(f"LoRAPrune on {args.shape}: {result['steps_per_second']:.2f} steps/s at batch {args.batch_size} x "
          f"{args.seq_len}, peak {run.peak_memory_bytes / 2**30:.2f} GiB ({run.peak_memory_kind})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
