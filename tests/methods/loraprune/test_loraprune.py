"""LoRAPrune: the LoRA-guided criterion, the progressive schedule, resume and data parallelism."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import TESTS, assert_resume_matches
from loraprune_run import run
from tiny import tiny_model, tokens

from prunetune.importance import lora_guided
from prunetune.importance.lora_guided import lora_guided_scores, projection_unit_scores
from prunetune.training.lora import LoraSettings, add_lora, lora_matrices
from prunetune.methods.loraprune.pruner import LoRAPruner, LoRAPruneSettings, cubic_fraction
from prunetune.structure.allocate import target_counts
from prunetune.structure.masks import Masks
from prunetune.structure.units import Structure, decoder_layers, unit_sums
from prunetune.training.loop import TrainSettings, train


def _reference(name, W, A, B, gA, gB, s, head_dim, score):
    estimate = gB @ A + B @ gA - gB @ gA
    per_weight = estimate * (W + s * B @ A)
    per_weight = per_weight.abs() if score == "abs" else per_weight.square()
    return unit_sums(name, per_weight, head_dim)


@pytest.mark.parametrize("name", ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"])
@pytest.mark.parametrize("score", ["abs", "square"])
def test_blockwise_score_equals_the_formula(name, score, monkeypatch):
    monkeypatch.setattr(lora_guided, "ROW_BLOCK", 32)  # several blocks even for tiny matrices
    g = torch.Generator().manual_seed(0)
    out, inp, r, hd = (96, 80, 4, 16) if name != "down_proj" else (80, 96, 4, 16)
    W, A, B = torch.randn(out, inp, generator=g), torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
    gA, gB = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
    got = projection_unit_scores(name, W, A, B, gA, gB, 2.0, hd, score)
    assert torch.allclose(got, _reference(name, W, A, B, gA, gB, 2.0, hd, score), rtol=1e-4)


def test_model_scores_use_lora_gradients_only():
    model = add_lora(tiny_model("qwen3"), LoraSettings(dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    scores = lora_guided_scores(model, normalize=False)
    layer = decoder_layers(model)[1]
    parts = {m.name: _reference(m.name, m.module.base_layer.weight, m.A, m.B, m.A.grad, m.B.grad, m.scaling,
                                16, "abs") for m in lora_matrices(layer)}
    assert torch.allclose(scores[1].q_heads, parts["q_proj"] + parts["o_proj"], rtol=1e-4)
    assert torch.allclose(scores[1].channels, parts["gate_proj"] + parts["up_proj"] + parts["down_proj"], rtol=1e-4)
    normalized = lora_guided_scores(model)
    assert torch.isfinite(normalized[0].channels).all() and normalized[0].channels.max() <= 1.0 + 1e-6


def test_cubic_schedule():
    values = [cubic_fraction(s, 100, 0.1, 0.1) for s in range(101)]
    assert values[10] == 0.0 and values[90] == 1.0 and values[100] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[30] > 0.5  # cubic: fast at first, slow near the target


def test_progressive_masks_never_revive_and_reach_the_target_exactly():
    model = tiny_model("llama", intermediate_size=128)
    structure = Structure.of(model)
    model = add_lora(model, LoraSettings(dropout=0.0))
    pruner = LoRAPruner(model, structure, ratio=0.5, layers=[1, 2], units=("heads", "channels"),
                        head_unit="kv-group", round_to=8, allocation="uniform",
                        settings=LoRAPruneSettings(prune_every=2), total_steps=20, split="heads-first")
    seen: list[Masks] = []
    apply = pruner._apply
    pruner._apply = lambda masks: (seen.append(masks), apply(masks))
    blocks = torch.randint(0, 96, (32, 16), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=20, batch_size=4, seq_len=16, lr=5e-4)
    train(model, blocks, torch.ones_like(blocks, dtype=torch.bool), settings, hooks=pruner, progress=False)
    final = pruner.finish()
    assert len(seen) >= 5
    for earlier, later in zip(seen, seen[1:]):
        for i in (1, 2):
            for kind in ("heads", "channels"):
                a, b = getattr(earlier, kind).get(i), getattr(later, kind).get(i)
                if a is not None:
                    assert b is not None and not (b & ~a).any(), "a pruned unit came back"
    expected = target_counts(structure, 0.5, [1, 2], ("heads", "channels"), "kv-group", 8)
    assert pruner.counts == expected
    for i in (1, 2):
        assert int(final.channels[i].sum()) == expected[i].channels
        assert int(final.kv_heads(i, structure).sum()) == expected[i].head_units
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    def fresh():
        model = tiny_model("mistral", intermediate_size=128)
        structure = Structure.of(model)
        torch.manual_seed(0)
        model = add_lora(model, LoraSettings(dropout=0.1))  # dropout: the RNG must resume too
        pruner = LoRAPruner(model, structure, ratio=0.5, layers=[0, 1, 2, 3], units=("heads", "channels"),
                            head_unit="q-head", round_to=8, allocation="uniform",
                            settings=LoRAPruneSettings(prune_every=3), total_steps=18)
        return model, structure, pruner

    blocks = torch.randint(0, 96, (40, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(blocks, dtype=torch.bool)
    settings = TrainSettings(steps=18, batch_size=2, grad_accum=2, seq_len=16, checkpoint_every=4, lr=5e-3)

    assert_resume_matches(fresh, blocks, mask, settings, tmp_path, stop_after=10, resumed_from=8)


@pytest.mark.parametrize("distill, moe", [(False, False), (False, True),
                                         pytest.param(True, False, marks=pytest.mark.slow)],  # a second path
                         ids=["plain", "mixture", "distilled"])
def test_two_processes_prune_like_one_with_the_same_global_batch(tmp_path, distill, moe):
    """`accelerate launch` with two CPU processes (gloo DDP), batch 2 each, against one process with batch 4;
    distilled, each process runs the teacher (the unpruned base) on its own half of the batch. On a
    mixture of experts (a tiny Mixtral by heads, experts and expert channels) the routing counts are
    both processes' together: each routed only its half of the batch."""
    _, model, structure, masks, _, result = run(batch_size=4, distill=distill, moe=moe)
    out = tmp_path / "two.json"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(TESTS / "loraprune_run.py"), str(out), "2", *(["distill"] if distill else []), *(["moe"] if moe else [])],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    assert two["masks"] == masks.kept_summary(structure)
    for name, value in model.named_parameters():
        if "lora_" in name:
            assert two["lora"][name] == pytest.approx(value.detach().double().sum().item(), abs=1e-3)
    one = result.routing.record(structure.top_k)
    assert two["routing"] == one and (one["tokens"] > 0) == moe


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("base", torch.bfloat16)])
def test_lora_dtype(dtype, expected):
    model = tiny_model("llama").to(torch.bfloat16)
    peft_model = add_lora(model, LoraSettings(dtype=dtype))
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {expected}
    x = tokens()
    peft_model(input_ids=x, labels=x).loss.backward()
    assert lora_guided_scores(peft_model)[0].channels.dtype == torch.float32
