"""benchmarks/torch_pruning_peer.py, the heldout benchmark's Torch-Pruning row, with the real Torch-Pruning:
it reaches the size it is asked for and writes a model stock transformers loads, outputs intact."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from tiny import save_tiny_model_dir, tokens

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_pruning_peer.py"


def test_torch_pruning_peer_cuts_mlp_channels_to_the_asked_size(tmp_path):
    from transformers import AutoModelForCausalLM

    source = save_tiny_model_dir(tmp_path / "tiny")
    dense = AutoModelForCausalLM.from_pretrained(source)
    total = sum(p.numel() for p in dense.parameters())
    per_channel = 3 * dense.config.hidden_size * dense.config.num_hidden_layers
    target = total - 8 * per_channel  # eight channels in every layer
    subprocess.run([sys.executable, str(SCRIPT), str(source), "--params", str(target), "--out", str(tmp_path / "tp"),
                    "--calib-samples", "4", "--seq-len", "32"], check=True, capture_output=True)

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "tp")  # stock transformers, no prunetune code
    assert sum(p.numel() for p in pruned.parameters()) == target
    assert pruned.config.intermediate_size == dense.config.intermediate_size - 8
    assert all(layer.self_attn.q_proj.weight.shape == dense.model.layers[0].self_attn.q_proj.weight.shape
               for layer in pruned.model.layers)  # attention whole
    with torch.no_grad():
        assert torch.isfinite(pruned(tokens(vocab=100)).logits).all()
    recorded = json.loads((tmp_path / "tp" / "torch_pruning.json").read_text())
    assert recorded["parameters"] == target and recorded["units"] == "MLP channels"
