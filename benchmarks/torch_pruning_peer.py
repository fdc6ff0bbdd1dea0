"""The Torch-Pruning peer: what a user who reaches for Torch-Pruning instead of prunetune gets.

Torch-Pruning (`pip install torch-pruning`, the version pyproject's `baselines` extra pins) traces the
model's dependency graph and cuts whole groups. This script scores every MLP channel group (a gate_proj
row, the up_proj row and the down_proj column that go with it) by its first-order Taylor importance,
|weight x gradient| summed over the group, with the gradient of the language-model loss on the same
calibration sequences prunetune's `taylor` uses (the first --calib-samples training blocks), and removes
the same share of channels in every layer: Torch-Pruning's local (per-layer) pruning. Attention stays
whole, as in Torch-Pruning's own Llama example when heads are not asked for.

The share is chosen so that the result has --params parameters (another method's count, for a
comparison at equal size): every channel costs the same three rows of the hidden size. The model is
saved where stock transformers loads it (prunetune's writer rewrites config.intermediate_size), ready for the same LoRA
recovery every baseline gets (`prunetune train --lora`).

    python benchmarks/torch_pruning_peer.py smollm2-135m --params 117262656 --out runs/tp-20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def mlp_share(model, target_params: int) -> tuple[int, int]:
    """How many of every layer's MLP channels to remove so that the model keeps `target_params`, and of how many."""
    total = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    per_channel = sum(m.weight.shape[1] if m is not layers[0].mlp.down_proj else m.weight.shape[0]
                      for m in (layers[0].mlp.gate_proj, layers[0].mlp.up_proj, layers[0].mlp.down_proj))
    channels = layers[0].mlp.gate_proj.out_features
    remove = round((total - target_params) / per_channel / len(layers))
    if not 0 < remove < channels:
        raise SystemExit(f"--params {target_params:,} cannot be reached by MLP channels alone "
                         f"(the model has {total:,} parameters)")
    return remove, channels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--params", type=int, required=True, help="parameter count of the result")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default="builtin:pydoc")
    parser.add_argument("--calib-samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    import torch_pruning as tp

    from prunetune.data import load_blocks
    from prunetune.export.hf import save_model
    from prunetune.models import load_model

    started = time.time()
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    model.config.use_cache = False
    remove, channels = mlp_share(model, args.params)
    share = remove / channels
    blocks, _ = load_blocks(args.data, tokenizer, args.seq_len, default_split="train")
    calibration = blocks[: args.calib_samples]

    mlps = [layer.mlp for layer in model.model.layers]
    roots = {m for mlp in mlps for m in (mlp.gate_proj, mlp.up_proj)}
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m not in roots]
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=calibration[:1], importance=tp.importance.TaylorImportance(),
        # Torch-Pruning keeps int(channels x (1 - ratio)): half a channel of slack so the float rounds to `remove`
        pruning_ratio=(remove - 0.5) / channels, ignored_layers=ignored, global_pruning=False)
    model.zero_grad()
    for batch in calibration.split(args.batch_size):  # the loss's gradient over the calibration sequences
        model(input_ids=batch, labels=batch).loss.backward()
    pruner.step()
    model.zero_grad(set_to_none=True)

    kept = mlps[0].gate_proj.out_features
    if any(m.gate_proj.out_features != kept or m.down_proj.in_features != kept for m in mlps):
        raise SystemExit("Torch-Pruning left MLPs of different widths; the script expects one width")
    params = sum(p.numel() for p in model.parameters())
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, args.out)  # the built-in model comes from a GGUF file: written as safetensors
    (args.out / "torch_pruning.json").write_text(json.dumps({
        "torch_pruning": tp.__version__, "importance": "TaylorImportance (first order)", "units": "MLP channels",
        "share_removed": share, "intermediate_size": kept, "parameters": params, "target_parameters": args.params,
        "calibration": {"data": args.data, "samples": args.calib_samples, "seq_len": args.seq_len},
        "seconds": round(time.time() - started, 1)}, indent=1) + "\n")
    print(f"Torch-Pruning: {share:.3f} of every MLP removed, intermediate {kept}, {params:,} parameters "
          f"({params / args.params - 1:+.2%} against the target) -> {args.out}")


if __name__ == "__main__":
    main()
