"""Taylor and Wanda-sp scores of a tiny model with the model sharded (run under `accelerate launch` with
the FSDP config), for tests/test_fsdp.py to compare with one process.

Usage: python sharded_scores_run.py OUT.json
Writes, from the main process: each criterion's unit scores, and the checksums of the plain model each
criterion hands back (on every process; process 1's are written too).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from tiny import tiny_model  # noqa: E402

from prunetune.importance.sharded import SHARDED_CRITERIA  # noqa: E402
from prunetune.training.loop import TrainSettings, make_accelerator

ARCH = "qwen2"  # biases on q, k, v: the scores cover the weights only, as in one process


def calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return list(torch.randint(0, 96, (5, 16), generator=generator).split(2))  # three batches: one process runs two


def checksums(model) -> dict[str, float]:
    return {n: p.detach().double().sum().item() for n, p in model.named_parameters()}


def scores_dict(scores) -> list[dict]:
    return [{k: v.tolist() for k, v in vars(s).items() if v is not None} for s in scores]


if __name__ == "__main__":
    accelerator = make_accelerator(TrainSettings())
    result = {"distributed": str(accelerator.distributed_type)}
    for name, criterion in SHARDED_CRITERIA.items():
        model = tiny_model(ARCH, intermediate_size=128)
        scores, plain = criterion(model, calibration())
        gathered = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, checksums(plain))
        result[name] = {"scores": scores_dict(scores), "weights": gathered,
                        "requires_grad": sorted(n for n, p in plain.named_parameters() if p.requires_grad)}
    if accelerator.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    accelerator.end_training()  # closes the process group: left to teardown it can abort the process
