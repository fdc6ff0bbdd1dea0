"""benchmarks/gpu.sh, the one command for the day a GPU is lent, checked on its CPU path (tiny shapes):
every step runs, the one JSON file holds each part, and what each part computes (the criterion's loss,
the speed rows' parameters and FLOPs, the planner's errors, the ratios) matches a computation made
here independently. Timings are only checked to be consistent with themselves, never against a bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT

from prunetune.bench.shapes import random_model, shape_config

pytestmark = pytest.mark.slow  # runs four benchmark scripts end to end (minutes)

# What GPU_SH_QUICK=1 passes to each step (benchmarks/gpu.sh).
CRITERION_SEQ_LEN, SPEED_LAYERS, SPEED_PROMPT, STEPS = 64, 2, 32, 3


def _criterion_loss(seq_len: int, seed: int) -> float:
    """The next-token loss bench-criterion's tiny model has on its batch, from the logits by hand."""
    model = random_model(shape_config("tiny", seq_len), torch.device("cpu"), torch.float32, seed)
    generator = torch.Generator().manual_seed(seed + 1)  # the batch bench-criterion draws
    batch = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    return F.cross_entropy(logits[0, :-1], batch[0, 1:]).item()


def _dense_parameters_and_flops(layers: int, tokens: int) -> tuple[int, int]:
    """The dense speed model's parameters, and 2 × the multiply-adds of its prefill: every linear layer
    for every token, Q·Kᵀ and scores·V over the causal pairs, lm_head for the last token only."""
    from transformers import AutoModelForCausalLM

    config = shape_config("tiny", num_hidden_layers=layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    flops = 0
    for layer in model.model.layers:
        flops += sum(2 * tokens * m.in_features * m.out_features
                     for m in layer.modules() if isinstance(m, torch.nn.Linear))
        flops += 2 * 2 * (tokens * (tokens + 1) // 2) * head_dim * config.num_attention_heads
    flops += 2 * config.hidden_size * config.vocab_size
    return parameters, flops


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], capture_output=True, text=True,
                          env=dict(os.environ, GPU_SH_QUICK="1", PYTHON=sys.executable), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_script_runs_every_step_on_tiny_shapes(result):
    assert set(result) == {"criterion", "speed", "plan_check", "loraprune_steps"}

    # Criterion, without and with checkpointing: Taylor and LoRA-guided (B = 0) step the same model on
    # the same batch, so both report its loss; the int8 base rounds the weights, so only close to it.
    assert [r["settings"]["gradient_checkpointing"] for r in result["criterion"]] == [False, True]
    for record in result["criterion"]:
        settings = record["settings"]
        assert (settings["shape"], settings["seq_len"]) == ("tiny", CRITERION_SEQ_LEN)
        want = _criterion_loss(settings["seq_len"], settings["seed"])
        variants = {v["variant"]: v for v in record["variants"]}
        assert variants["taylor"]["loss"] == pytest.approx(want, rel=1e-5)
        assert variants["lora-guided"]["loss"] == pytest.approx(want, rel=1e-5)
        if not variants["lora-guided-8bit"]["skipped"]:
            assert variants["lora-guided-8bit"]["loss"] == pytest.approx(want, abs=0.05)
        taylor = variants["taylor"]
        for v in variants.values():
            if v["skipped"]:
                continue
            assert v["memory_ratio"] == pytest.approx(v["peak_memory_bytes"] / taylor["peak_memory_bytes"])
            assert v["speedup"] == pytest.approx(taylor["step_seconds"] / v["step_seconds"])

    # Speed: the dense row's parameters and prefill FLOPs as counted here; every ratio against dense.
    speed = result["speed"]
    assert speed["layers"] == SPEED_LAYERS and speed["settings"]["prompt_len"] == SPEED_PROMPT
    rows = speed["rows"]
    (dense,) = [r for r in rows if r["model"] == "dense"]
    assert (dense["parameters"], dense["prefill_flops"]) == _dense_parameters_and_flops(SPEED_LAYERS, SPEED_PROMPT)
    assert {r["model"] for r in rows} == {"dense", "pruned-20", "pruned-20-unrounded", "pruned-50"}
    for row in rows:
        assert row["flops_ratio"] == pytest.approx(row["prefill_flops"] / dense["prefill_flops"])
        assert row["parameters_ratio"] == pytest.approx(row["parameters"] / dense["parameters"])
        if row["model"] != "dense" and row["variant"] != "lora-unmerged":
            assert row["parameters"] < dense["parameters"] and row["prefill_flops"] < dense["prefill_flops"]
    by_model = {r["model"]: r for r in rows if r["variant"] == "model"}
    assert by_model["pruned-50"]["parameters"] < by_model["pruned-20"]["parameters"]

    # The planner against the measured peaks: each error is (planned - measured) / measured, the
    # largest is the largest of them, and every case is within the target.
    plan = result["plan_check"]
    assert plan["rows"]
    for row in plan["rows"]:
        assert row["error"] == pytest.approx((row["planned"] - row["measured"]) / row["measured"])
    assert plan["largest_error"] == pytest.approx(max(abs(row["error"]) for row in plan["rows"]))
    assert plan["met"] == (plan["largest_error"] <= plan["target"]) and plan["met"]

    # LoRAPrune's steps: the rate is the steps over the time they took.
    steps = result["loraprune_steps"]
    assert steps["settings"]["steps"] == STEPS
    assert steps["steps_per_second"] == pytest.approx(STEPS / steps["seconds"])
    assert steps["peak_memory_bytes"] > 0
