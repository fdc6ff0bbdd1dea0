"""From scores and a ratio to masks: budgets, rounding, layer choice, grouped-query attention."""

import pytest
import torch
from tiny import tiny_model

from prunetune.errors import UserError
from prunetune.importance import magnitude_scores
from prunetune.structure.allocate import (
    achieved_ratio, paper_layers, parse_layers, parse_units, round_count, select_masks,
)
from prunetune.structure.units import Structure


def test_parse_layers():
    assert parse_layers("all", 30) == list(range(30))
    assert parse_layers("paper", 30) == list(range(3, 29))  # first 10% and the last layer kept
    assert paper_layers(32) == list(range(3, 31))
    assert parse_layers("0,2,5-7", 10) == [0, 2, 5, 6, 7]
    for bad in ("5-3", "x", "0-30"):
        with pytest.raises(UserError):
            parse_layers(bad, 30)


def test_parse_units():
    assert parse_units("heads,channels") == ("heads", "channels")
    with pytest.raises(UserError):
        parse_units("neurons")


def test_round_count():
    assert round_count(1297, 64, 1536) == 1280
    assert round_count(10, 64, 1536) == 64  # never below one multiple
    assert round_count(2000, 64, 1536) == 1536
    assert round_count(30, 64, 48) == 48  # a multiple larger than the layer keeps it whole


def test_default_rounding_is_128_on_wide_mlps_and_64_on_narrow_ones():
    from prunetune.structure.allocate import DEFAULT_ROUND_TO, parse_round_to, target_counts
    from prunetune.structure.units import LayerShape

    assert DEFAULT_ROUND_TO == "auto"
    assert round_count(8738, "auto", 11008) == 8704  # LLaMA-7B at 20%: 68 x 128 (64 would give 8768)
    assert round_count(1297, "auto", 1536) == 1280  # SmolLM2 at 20%: multiples of 64
    assert round_count(683, "auto", 1536) == 704
    llama7b = Structure("llama", 4096, 128, 32000, False, 4096, (LayerShape(32, 32, 11008),), False, False, False)
    for ratio, heads, channels in ((0.2, 26, 8704), (0.5, 16, 5504)):  # 8832 and 5504 prefilled fast on an H100
        counts = target_counts(llama7b, ratio, [0])[0]
        assert (counts.head_units, counts.channels) == (heads, channels) and channels % 128 == 0
    assert parse_round_to("auto") == "auto" and parse_round_to("64") == 64 and parse_round_to(8) == 8
    for bad in ("0", "-8", "x", "6.4"):
        with pytest.raises(UserError, match="PruneSettings.round_to"):
            parse_round_to(bad)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_budget_is_met_and_heads_respect_groups(ratio):
    model = tiny_model("llama", intermediate_size=256, num_hidden_layers=3)
    s = Structure.of(model)
    layers = list(range(s.num_layers))
    masks = select_masks(s, magnitude_scores(model), ratio, layers, round_to=8)
    masks.validate(s)
    # Channel rounding to 8 of 256 moves the ratio by at most half a step per layer.
    slack = 4 * s.params_per_channel / s.prunable_params([0])
    assert abs(achieved_ratio(s, masks, layers, ("heads", "channels")) - ratio) <= slack + 1e-9
    for i in layers:
        assert int(masks.channels[i].sum()) % 8 == 0


def test_q_head_unit_keeps_equal_heads_per_group():
    model = tiny_model("mistral", num_attention_heads=6, num_key_value_heads=2)  # groups of 3
    s = Structure.of(model)
    masks = select_masks(s, magnitude_scores(model), 0.4, [0, 1], units=("heads",), head_unit="q-head")
    for i in (0, 1):
        per_group = masks.heads[i].reshape(2, 3).sum(dim=1)
        assert per_group.tolist() == [2, 2]
    masks.validate(s)


def test_magnitude_keeps_the_largest_units():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[5].mul_(100)
        model.model.layers[0].self_attn.k_proj.weight[16:32].mul_(100)  # kv head 1
    s = Structure.of(model)
    masks = select_masks(s, magnitude_scores(model), 0.5, [0], round_to=1)
    assert masks.channels[0][5]
    assert masks.kv_heads(0, s)[1]


def test_bad_ratio_and_unit():
    s = Structure.of(tiny_model("qwen2"))
    scores = magnitude_scores(tiny_model("qwen2"))
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="between 0 and 1"):
            select_masks(s, scores, ratio, [0])
    with pytest.raises(UserError):
        select_masks(s, scores, 0.3, [0], head_unit="neuron")


def _synthetic_scores(structure, head_value: float, channel_value: float, weak_group: int | None = None):
    """Per-unit scores proportional to each unit's parameters times a value per parameter."""
    from prunetune.structure.scores import LayerScores

    scores = []
    for shape in structure.layers:
        q = torch.full((shape.num_heads,), head_value * structure.params_per_q_head)
        kv = torch.full((shape.num_kv_heads,), head_value * structure.params_per_kv_head)
        if weak_group is not None:
            q.view(shape.num_kv_heads, -1)[weak_group] = 0.0
            kv[weak_group] = 0.0
        channels = channel_value * structure.params_per_channel * torch.linspace(0.5, 1.5, shape.intermediate)
        scores.append(LayerScores(q, kv, channels))
    return scores


def test_cost_split_keeps_heads_worth_more_per_parameter_than_channels():
    from prunetune.structure.allocate import final_counts, target_counts

    structure = Structure.of(tiny_model("llama", intermediate_size=256))
    layers = [0, 1, 2]
    heads_first = target_counts(structure, 0.3, layers, head_unit="kv-group", round_to=8)
    precious_heads = final_counts(structure, _synthetic_scores(structure, 10.0, 1.0), 0.3, layers,
                                  head_unit="kv-group", round_to=8, split="cost")
    assert all(c.head_units == 3 for c in precious_heads.values())  # every head stays; channels pay
    assert all(h.head_units < 3 for h in heads_first.values())  # heads-first removes a group whatever the scores
    weak_group = final_counts(structure, _synthetic_scores(structure, 10.0, 1.0, weak_group=1), 0.3, layers,
                              head_unit="kv-group", round_to=8, split="cost")
    assert all(c.head_units == 2 for c in weak_group.values())  # a worthless group goes, channels are spared
    assert all(w.channels > p.channels for w, p in zip(weak_group.values(), precious_heads.values()))
    for counts in (precious_heads, weak_group):  # within the budget's rounding
        masks = select_masks(structure, _synthetic_scores(structure, 10.0, 1.0), 0.3, layers, head_unit="kv-group",
                             round_to=1, split="cost")
        assert abs(achieved_ratio(structure, masks, layers, ("heads", "channels")) - 0.3) < 0.02


def test_cost_split_under_uniform_allocation_gives_every_pruned_layer_one_shape():
    structure = Structure.of(tiny_model("mistral", intermediate_size=128))
    scores = magnitude_scores(tiny_model("mistral", intermediate_size=128))
    masks = select_masks(structure, scores, 0.4, list(range(structure.num_layers)), head_unit="q-head", round_to=8,
                         split="cost")
    kept = {(int(masks.heads[i].sum()) if i in masks.heads else -1, int(masks.channels[i].sum()) if i in masks.channels
             else -1) for i in range(structure.num_layers)}
    assert len(kept) == 1


def test_cost_split_with_global_allocation_ranks_every_unit_by_score_per_parameter():
    from prunetune.structure.allocate import final_counts

    structure = Structure.of(tiny_model("qwen2", intermediate_size=128))
    scores = _synthetic_scores(structure, 1.0, 1.0)
    for unit in ("q_heads", "kv_heads", "channels"):  # layer 0 is worth little, layer 1 a lot
        setattr(scores[0], unit, getattr(scores[0], unit) * 0.01)
        setattr(scores[1], unit, getattr(scores[1], unit) * 100)
    counts = final_counts(structure, scores, 0.3, [0, 1, 2], head_unit="kv-group", round_to=1, allocation="global",
                          split="cost")
    assert counts[0].head_units == 1  # every layer keeps a head unit, even the cheapest
    assert counts[1].head_units == 3 and counts[1].channels == 128  # the valuable layer is untouched
    masks = select_masks(structure, scores, 0.3, [0, 1, 2], head_unit="kv-group", round_to=1, allocation="global",
                         split="cost")
    assert achieved_ratio(structure, masks, [0, 1, 2], ("heads", "channels")) >= 0.3 - 0.01


def test_one_kind_of_unit_ignores_the_split():
    from prunetune.structure.allocate import final_counts, target_counts

    structure = Structure.of(tiny_model("llama", intermediate_size=128))
    scores = _synthetic_scores(structure, 10.0, 1.0)
    for units in (("channels",), ("heads",)):
        assert final_counts(structure, scores, 0.3, [0, 1], units, round_to=8, split="cost") == \
            target_counts(structure, 0.3, [0, 1], units, round_to=8)


@pytest.mark.parametrize("head_unit", ["kv-group", "q-head"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_cost_split_meets_the_budget_with_either_head_unit(head_unit, ratio):
    """The kept key/value heads of q-head pruning count against the budget (they once did not)."""
    structure = Structure.of(tiny_model("llama", intermediate_size=256))
    for head_value in (10.0, 0.001):  # heads precious or worthless: channels pay, or heads go
        masks = select_masks(structure, _synthetic_scores(structure, head_value, 1.0), ratio, [0, 1, 2],
                             head_unit=head_unit, round_to=1, split="cost")
        assert abs(achieved_ratio(structure, masks, [0, 1, 2], ("heads", "channels")) - ratio) < 0.01
