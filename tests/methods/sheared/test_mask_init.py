"""Sheared-LLaMA's importance start: ordered log α, ties broken by score, a suspended mask is the source."""

import pytest
import torch
from tiny import tiny_model, tokens

from prunetune.importance.layers import block_influence, hidden_channel_scores
from prunetune.methods.sheared.hard_concrete import INIT_SPREAD, LOG_ALPHA_MAX, LOG_ALPHA_MIN, HardConcrete
from prunetune.methods.sheared.l0_masks import ShearMasks
from prunetune.methods.sheared.mask_init import calibration_batches, mask_priorities
from prunetune.methods.sheared.target import parse_target
from prunetune.structure.units import Structure

TARGET = "layers=3,hidden=64,heads=4,kv-heads=2,intermediate=32"


def test_the_importance_start_orders_log_alpha_and_keeps_every_unit():
    gates = HardConcrete(2, 5, keep=2)
    gates.init_from(torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.7], [5.0, 4.0, 3.0, 2.0, 1.0]]))
    la = gates.log_alpha.detach()
    assert la[0].argsort(descending=True).tolist() == [1, 4, 3, 0, 2]
    assert la.max() == pytest.approx(LOG_ALPHA_MAX) and la.min() == pytest.approx(LOG_ALPHA_MAX - INIT_SPREAD)
    assert (gates.keep_probability() > 0.9).all()  # every unit still kept at the start, as in the paper
    assert gates.keep_mask().tolist() == [[False, True, False, False, True], [True, True, False, False, False]]


def test_without_a_warm_up_the_masks_start_at_the_target():
    gates = HardConcrete(1, 6, keep=2, groups=2)
    gates.init_from(torch.tensor([[1.0, 3.0, 2.0, 9.0, 8.0, 7.0]]), at_target=True)
    kept = [False, True, False, True, False, False]  # the best of each group
    assert gates.keep_mask().tolist() == [kept]
    p = gates.keep_probability()[0]
    assert (p[torch.tensor(kept)] > 0.99).all() and (p[~torch.tensor(kept)] < 0.12).all()


def test_ties_at_a_clamp_go_to_the_higher_score_then_the_lower_index():
    gates = HardConcrete(1, 6, keep=3)
    with torch.no_grad():
        gates.log_alpha.fill_(LOG_ALPHA_MIN - 1)  # all clamped to the same value
    assert gates.keep_mask().tolist() == [[True, True, True, False, False, False]]  # no score: by index
    gates.init_from(torch.tensor([[0.0, 1.0, 0.0, 3.0, 2.0, 0.0]]))
    with torch.no_grad():
        gates.log_alpha.fill_(LOG_ALPHA_MIN - 1)
    assert gates.keep_mask().tolist() == [[False, True, False, True, True, False]]


def test_grouped_gates_keep_the_best_of_each_group():
    gates = HardConcrete(1, 6, keep=2, groups=2)  # query heads in two kv groups of three
    gates.init_from(torch.tensor([[1.0, 3.0, 2.0, 9.0, 8.0, 7.0]]))
    assert gates.keep_mask().tolist() == [[False, True, False, True, False, False]]


def test_block_influence_finds_a_layer_that_does_nothing():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    influence = block_influence(model, [tokens()])
    assert influence.shape == (4,) and influence[2] == pytest.approx(0, abs=1e-6)
    assert (influence[[0, 1, 3]] > 1e-4).all()


def test_hidden_channel_scores_see_a_dead_channel():
    model = tiny_model("qwen3")
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).weight[:, 7] = 0
            layer.mlp.gate_proj.weight[:, 7] = 0
            layer.mlp.up_proj.weight[:, 7] = 0
    scores = hidden_channel_scores(model, [tokens()])
    assert scores.shape == (96,) and scores.argmin() == 7 and scores[7] == 0


@pytest.mark.parametrize("criterion", ["taylor", "wanda-sp", "magnitude", "lora-guided"])
def test_mask_priorities_cover_every_gate_set(criterion):
    model = tiny_model("qwen2")
    structure = Structure.of(model)
    masks = ShearMasks(structure, parse_target(TARGET, structure), warmup_steps=0)
    blocks = torch.cat([tokens(4, 16, seed=s) for s in (1, 2)])
    priorities = mask_priorities(model, masks, criterion, blocks, samples=4, batch_size=2, seed=0)
    assert {k: tuple(v.shape) for k, v in priorities.items()} == {
        k: tuple(d.log_alpha.shape) for k, d in masks.distributions.items()}
    masks.init_from(priorities)
    assert all(d.priority.abs().sum() > 0 for d in masks.distributions.values())
    # no warm-up: the expected size starts at the target's (within the pruned units' leftover chance)
    for kind, d in masks.distributions.items():
        keep, expected = float(d.keep.float().mean()), float(d.keep_probability().detach().sum(-1).mean())
        assert expected == pytest.approx(keep, abs=0.12 * (d.size - keep) + 0.01)
    assert not any(p.grad is not None for p in model.parameters())  # the scoring left no gradients behind


def test_calibration_batches_spread_over_every_domain():
    blocks = torch.arange(20).reshape(20, 1)  # two domains: rows 0-9 and 10-19
    batches = calibration_batches(blocks, samples=4, batch_size=3)
    picked = torch.cat(batches).flatten().tolist()
    assert picked == [0, 6, 13, 19] and [len(b) for b in batches] == [3, 1]


def test_suspended_masks_give_the_source_model():
    model = tiny_model("mistral")
    x = tokens()
    with torch.no_grad():
        source = model(x).logits
    structure = Structure.of(model)
    masks = ShearMasks(structure, parse_target(TARGET, structure), warmup_steps=4)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.copy_(torch.randn(p.shape))
    with masks.attach(model) as handle, torch.no_grad():
        masked = model(x).logits
        with handle.suspended():
            assert torch.equal(model(x).logits, source)
        assert torch.equal(model(x).logits, masked)
