"""A small LoRAPrune run on a tiny model, for tests that need a separate process (accelerate launch).

Usage: python loraprune_run.py OUT.json BATCH_SIZE [distill] [moe]
Writes, from the main process: the final masks (as kept indices), the moving average of the unit
scores, the LoRA weights' checksum and, on a mixture of experts (`moe`: a tiny Mixtral pruned by
heads, experts and expert channels), how often each expert was routed to in all processes together.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from tiny import tiny_model  # noqa: E402

from prunetune.training.distill import DistillSettings, self_teacher_for
from prunetune.training.lora import LoraSettings, add_lora
from prunetune.methods.loraprune.pruner import LoRAPruner, LoRAPruneSettings  # noqa: E402
from prunetune.structure.experts import count_routing  # noqa: E402
from prunetune.structure.units import Structure  # noqa: E402
from prunetune.training.loop import TrainSettings, make_accelerator, train


def run(batch_size: int, steps: int = 12, distill: bool = False, memory_steps: int | None = 2, moe: bool = False,
        **train_kwargs):
    model = tiny_model("mixtral") if moe else tiny_model("qwen2", intermediate_size=128)
    units = ("heads", "experts", "expert-channels") if moe else ("heads", "channels")
    structure = Structure.of(model)
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(dropout=0.0), experts=moe)
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 96, (48, 24), generator=generator)
    mask = torch.ones_like(blocks, dtype=torch.bool)
    settings = TrainSettings(steps=steps, batch_size=batch_size, seq_len=24, lr=1e-2, **train_kwargs)
    layers = list(range(structure.num_layers)) if moe else [0, 1, 2]  # a mixture prunes every layer alike
    pruner = LoRAPruner(model, structure, ratio=0.5, layers=layers, units=units,
                        head_unit="kv-group", round_to=4 if moe else 8, allocation="uniform",
                        settings=LoRAPruneSettings(prune_every=2), total_steps=steps)
    accelerator = make_accelerator(settings)
    teacher = None
    distill_settings = DistillSettings(enabled=distill)
    if distill:  # the unpruned base as teacher, run once per micro-batch in every process
        teacher = self_teacher_for(model, pruner.masks_off, distill_settings)
    with count_routing(model, with_grad_only=True) as routing:
        result = train(model, blocks, mask, settings, hooks=pruner, accelerator=accelerator, progress=False,
                       teacher=teacher, distill=distill_settings, memory_steps=memory_steps)
    result.routing = routing.summed(accelerator)
    masks = pruner.finish()
    return accelerator, model, structure, masks, pruner, result


if __name__ == "__main__":
    out, batch = sys.argv[1], int(sys.argv[2])
    accelerator, model, structure, masks, pruner, result = run(batch, distill="distill" in sys.argv[3:],
                                                               moe="moe" in sys.argv[3:])
    if accelerator.is_main_process:
        model = result.model  # under FSDP the weights gathered on the main process
        lora = {n: p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_" in n}
        with open(out, "w") as f:
            json.dump({"masks": masks.kept_summary(structure), "lora": lora,
                       "losses": [h["loss"] for h in result.history], "processes": accelerator.num_processes,
                       "average": [{k: v.tolist() for k, v in vars(s).items() if v is not None}
                                   for s in pruner.average],
                       "distributed": str(accelerator.distributed_type),
                       "routing": result.routing.record(structure.top_k)}, f)
    accelerator.end_training()  # closes the process group: left to teardown it can abort the process
