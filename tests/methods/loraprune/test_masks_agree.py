"""Mask agreement (`prunetune masks-agree`): how far LoRA-guided scores keep the units vanilla Taylor keeps."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_user_error, run_cli
from tiny import tiny_model, tokens

from prunetune.errors import UserError
from prunetune.importance import taylor_scores
from prunetune.training.lora import LoraSettings, add_lora, lora_matrices
from prunetune.methods.loraprune.masks_agree import (
    AgreeSettings, accumulate_scores, compare_masks, compare_scores, masks_agree, overlap, parse_ratios,
    random_overlap, randomize_lora_b,
)
from prunetune.structure.allocate import select_masks
from prunetune.structure.units import Structure, decoder_layers


def test_overlap_and_random_baseline():
    a = torch.tensor([True, True, False, False])
    assert overlap(a, a) == 1.0 and overlap(~a, ~a) == 1.0
    assert overlap(a, ~a) == 0.0
    assert overlap(a, torch.tensor([True, False, True, False])) == 0.5
    assert overlap(torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)) is None
    assert random_overlap([2], [4]) == 0.5  # kept fraction
    assert random_overlap([3, 1], [4, 4]) == pytest.approx((9 / 4 + 1 / 4) / 4)


def test_identical_scores_agree_completely():
    model = tiny_model("llama")
    structure = Structure.of(model)
    scores = taylor_scores(model, [tokens()])
    layers = list(range(structure.num_layers))
    for entry in compare_scores(structure, scores, scores, (0.1, 0.3, 0.5), layers, round_to=1):
        for kind in ("heads", "channels"):
            assert entry[kind]["overlap_kept"] == 1.0
            assert entry[kind]["overlap_pruned"] in (1.0, None)
    masks = select_masks(structure, scores, 0.5, layers, round_to=1)
    assert compare_masks(structure, masks, masks, layers, "channels")["overlap_pruned"] == 1.0


def test_one_pass_gives_taylor_and_lora_guided_scores():
    model = add_lora(tiny_model("llama"), LoraSettings(dropout=0.0))
    randomize_lora_b(model, seed=0)
    assert all(m.B.abs().sum() > 0 for layer in decoder_layers(model) for m in lora_matrices(layer))
    batches = [tokens(seed=1), tokens(seed=2)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    taylor, lora = accumulate_scores(model, batches)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # put back as found
    assert all(p.grad is None for p in model.parameters())
    # Taylor from the shared pass is taylor_scores of the mean loss (taylor_scores sums the batches).
    for got, want in zip(taylor, taylor_scores(model, batches)):
        torch.testing.assert_close(got.channels * len(batches), want.channels, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(got.q_heads * len(batches), want.q_heads, rtol=1e-4, atol=1e-8)
    for s in lora:
        assert (s.channels > 0).all() and torch.isfinite(s.q_heads).all()

    structure = Structure.of(model)
    results = compare_scores(structure, taylor, lora, (0.1, 0.2, 0.3, 0.5), list(range(structure.num_layers)))
    assert [r["ratio"] for r in results] == [0.1, 0.2, 0.3, 0.5]
    for entry in results:
        for kind in ("heads", "channels"):
            c = entry[kind]
            for key in ("overlap_kept", "overlap_pruned", "random_kept", "random_pruned"):
                assert c[key] is None or 0.0 <= c[key] <= 1.0, (key, c)
            assert 0 < c["kept"] <= c["units"]


def test_parse_ratios():
    assert parse_ratios("0.1, 0.2,0.5") == (0.1, 0.2, 0.5)
    for bad in ("0", "1", "0.2,-0.1", "x", ""):
        with pytest.raises(UserError, match="AgreeSettings.ratios"):
            parse_ratios(bad)
    with pytest.raises(UserError, match="AgreeSettings.ratios"):
        AgreeSettings(ratios=(1.2,)).check()


def test_masks_agree_on_a_tiny_model_with_lora_training(model_dir):
    settings = AgreeSettings(ratios=(0.2, 0.5), batches=2, seq_len=32, steps=2, layers="1-3")
    record = masks_agree(str(model_dir), settings, progress=False)
    assert record["command"] == "masks-agree" and record["layers"] == [1, 2, 3]
    assert record["lora"].startswith("trained 2 steps")
    assert [r["ratio"] for r in record["results"]] == [0.2, 0.5]
    for entry in record["results"]:
        for kind in ("heads", "channels"):
            assert entry[kind]["overlap_kept"] is None or 0.0 <= entry[kind]["overlap_kept"] <= 1.0
    json.dumps(record)


@pytest.mark.parametrize("args, fragments", [
    (("masks-agree", "smollm2-135m", "--ratios", "0.1,1.5"), ("--ratios", "1.5")),
    (("masks-agree", "smollm2-135m", "--ratios", "0,0.5"), ("--ratios",)),
])
def test_cli_mistakes_are_one_line(args, fragments, tmp_path, no_model_load):
    assert_user_error(run_cli(*args, cwd=tmp_path), *fragments)
