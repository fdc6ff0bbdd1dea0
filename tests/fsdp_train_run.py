"""Full-parameter training of a tiny model with the shared loop, for the FSDP tests (run under
`accelerate launch`, or alone for the one-process reference).

Usage: python fsdp_train_run.py OUT.json BATCH_SIZE [--lora] [--gradient-checkpointing] [--grad-accum N]
                                 [--checkpoint DIR --stop-after N | --resume DIR]
Writes, from the main process: the loss curve, the trained weights' checksums (of the model train()
hands back: under FSDP the one gathered on the main process), and every process's held state.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from tiny import tiny_model  # noqa: E402

from prunetune.training.lora import LoraSettings, add_lora
from prunetune.training.loop import TrainSettings, make_accelerator, train

STEPS = 6


def run(batch_size: int, lora: bool = False, checkpoint: str | None = None, stop_after: int | None = None,
        resume: bool = False, gradient_checkpointing: bool = False, grad_accum: int = 1):
    model = tiny_model("llama", intermediate_size=128)
    if lora:
        model = add_lora(model, LoraSettings(dropout=0.0))
    else:
        model.requires_grad_(True)
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 96, (48, 24), generator=generator)
    mask = torch.ones_like(blocks, dtype=torch.bool)
    settings = TrainSettings(steps=STEPS, batch_size=batch_size, seq_len=24, lr=1e-3,
                             checkpoint_every=3 if checkpoint else 0, gradient_checkpointing=gradient_checkpointing,
                             grad_accum=grad_accum)
    accelerator = make_accelerator(settings)
    result = train(model, blocks, mask, settings, accelerator=accelerator, progress=False, checkpoint_dir=checkpoint,
                   stop_after=stop_after, resume=resume)
    return accelerator, result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--checkpoint")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    accelerator, result = run(args.batch_size, args.lora, args.checkpoint or args.resume, args.stop_after,
                              resume=bool(args.resume), gradient_checkpointing=args.gradient_checkpointing,
                              grad_accum=args.grad_accum)
    if accelerator.is_main_process:
        model = result.model
        with open(args.out, "w") as f:
            json.dump({"processes": accelerator.num_processes,
                       "distributed": str(accelerator.distributed_type),
                       "losses": [h["loss"] for h in result.history],
                       "weights": {n: p.detach().double().sum().item() for n, p in model.named_parameters()},
                       "held": result.held_bytes,
                       "plain": all(type(p) is torch.nn.Parameter for p in model.parameters()),
                       "record": result.record(TrainSettings()) | {"history": None}}, f)
    accelerator.end_training()  # closes the process group: left to teardown it can abort the process
