"""Reproducible runs: one command run twice gives the same kept units, losses and numbers.

Every random draw of `prune`, `shear` and `train` comes from a source seeded by the run's seed (and
the step), never from whatever state torch's global generator was left in by what ran before: each
pair of runs here starts from a differently disturbed global generator and must still agree exactly.
Unit selection breaks exact ties by a stated rule: the lower unit index (and, ranking across layers,
the lower layer) is kept; the learned masks' final top-k does the same.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from prunetune.structure.scores import LayerScores
from prunetune.methods.sheared.continued import ContinueSettings, continue_training
from prunetune.methods.sheared.domain_training import DomainSettings
from prunetune.runs.settings import EvalSettings, RunOptions
from prunetune.methods.prune import PruneSettings, prune
from prunetune.methods.sheared.shear import ShearSettings, shear
from prunetune.structure.allocate import KeepCounts, global_counts, masks_from_counts
from prunetune.methods.sheared.hard_concrete import LOG_ALPHA_MAX, HardConcrete
from prunetune.methods.sheared.l0_masks import ShearMasks
from prunetune.methods.sheared.target import parse_target
from prunetune.structure.units import Structure
from prunetune.training.loop import TrainSettings

DOMAINS = "code=builtin:stdlib-code,prose=builtin:pydoc"
EVAL = EvalSettings(data="builtin:pydoc", seq_len=32, max_windows=2)
TIMING = {"seconds", "elapsed_seconds", "created", "peak_memory_bytes", "peak_rss_bytes", "peak_memory_kind",
          "teacher_seconds", "teacher_seconds_per_step"}  # wall-clock measurements, not results


def _disturb(seed: int) -> None:
    """Leave torch's global generator in a state of `seed`'s choosing, as other code before a run would."""
    torch.manual_seed(seed)
    torch.rand(int(torch.randint(1, 1000, ())))


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _options(steps: int, **training) -> RunOptions:
    return RunOptions(training=TrainSettings(steps=steps, batch_size=2, seq_len=32, lr=1e-3, **training),
                      overwrite=True, progress=False)


# ---------------------------------------------------------------------------------------------
# Whole runs, twice


@pytest.mark.slow  # two whole runs; the LoRAPrune pair below stays in make test
def test_two_identical_shear_runs_give_identical_masks_and_losses(model_dir, tmp_path):
    records = []
    for run in range(2):
        _disturb(run)
        records.append(shear(str(model_dir), tmp_path / f"run{run}",
                             ShearSettings(target="layers=3,hidden=64,heads=4,kv-heads=2,intermediate=32"),
                             DomainSettings(data=DOMAINS, dynamic=True, eval_every=2, eval_blocks=2),
                             EVAL, _options(6), log=lambda _: None))
    first, second = records
    assert first["kept"] == second["kept"]
    history = first["training"]["history"]
    assert [h["loss"] for h in history] == [h["loss"] for h in second["training"]["history"]]
    assert [h["masks"] for h in history] == [h["masks"] for h in second["training"]["history"]]
    assert [h["domain_weights"] for h in history] == [h["domain_weights"] for h in second["training"]["history"]]
    assert len({tuple(h["domain_weights"].values()) for h in history}) > 1  # the dynamic weights did move
    assert _without_timing(first["results"]) == _without_timing(second["results"])
    assert first["parameters"]["expected_by_masks"] == second["parameters"]["expected_by_masks"]


@pytest.mark.slow  # two whole runs; the LoRAPrune pair below stays in make test
def test_two_identical_train_runs_with_dynamic_loading_are_identical(model_dir, tmp_path):
    """LoRA (seeded initialisation, dropout from the seeded global generator) and dynamic loading."""
    records = []
    for run in range(2):
        _disturb(10 + run)
        records.append(continue_training(str(model_dir), tmp_path / f"run{run}", ContinueSettings(lora=True),
                                         DomainSettings(data=DOMAINS, dynamic=True, eval_every=2, eval_blocks=2,
                                                        references="code=2.0,prose=2.0"),
                                         EVAL, _options(6), log=lambda _: None))
    first, second = records
    assert _without_timing(first["training"]["history"]) == _without_timing(second["training"]["history"])
    assert first["data"]["final_weights"] == second["data"]["final_weights"]
    assert first["data"]["final_weights"] != {"code": 0.5, "prose": 0.5}  # the weights did move
    assert _without_timing(first["results"]) == _without_timing(second["results"])


def test_two_identical_loraprune_runs_keep_identical_units(model_dir, tmp_path):
    records = []
    for run in range(2):
        _disturb(20 + run)
        records.append(prune(str(model_dir), tmp_path / f"run{run}",
                             PruneSettings(method="loraprune", ratio=0.5, round_to=8), EVAL,
                             _options(8), log=lambda _: None))
    first, second = records
    assert first["kept"] == second["kept"]
    assert _without_timing(first["training"]) == _without_timing(second["training"])
    assert _without_timing(first["results"]) == _without_timing(second["results"])


# ---------------------------------------------------------------------------------------------
# The learned masks' random draws


def _masks(seed: int) -> ShearMasks:
    structure = Structure.of(tiny_model("qwen3"))
    return ShearMasks(structure, parse_target("layers=3,hidden=64,heads=3,kv-heads=3,intermediate=32", structure),
                      warmup_steps=4, seed=seed)


def _samples(masks: ShearMasks, draws: int = 3, disturb_between: bool = False) -> list[torch.Tensor]:
    out = []
    for i in range(draws):
        if disturb_between:  # dropout, evaluation or anything else drawing from the global generator
            _disturb(100 + i)
        out += [d.sample() for d in masks.distributions.values()]
    return out


def test_hard_concrete_draws_depend_on_the_seed_alone():
    _disturb(1)
    a = _masks(seed=0)
    _disturb(2)
    b = _masks(seed=0)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    plain, disturbed = _samples(a), _samples(b, disturb_between=True)
    assert all(torch.equal(x, y) for x, y in zip(plain, disturbed))
    other = _samples(_masks(seed=1))
    assert not all(torch.equal(x, y) for x, y in zip(plain, other))


def test_the_masks_generator_state_round_trips():
    masks = _masks(seed=3)
    _samples(masks, draws=2)
    state = masks.rng_state()
    expected = _samples(masks)
    again = _masks(seed=3)
    again.set_rng_state(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, _samples(again)))


def test_final_gates_break_ties_by_the_lower_index():
    gates = HardConcrete(2, 6, 3)
    with torch.no_grad():
        gates.log_alpha.fill_(LOG_ALPHA_MAX)  # all on the clamp, as many units are after a short shear
        gates.log_alpha[1] = torch.tensor([0.0, 2.0, 2.0, 1.0, 2.0, 2.0])
    assert gates.keep_mask().tolist() == [[True, True, True, False, False, False],
                                          [False, True, True, False, True, False]]
    grouped = HardConcrete(1, 6, 2, groups=2)  # equal numbers kept in each of two groups of three
    with torch.no_grad():
        grouped.log_alpha.fill_(1.0)
    assert grouped.keep_mask().tolist() == [[True, False, False, True, False, False]]


# ---------------------------------------------------------------------------------------------
# Unit selection with exactly tied scores


def _tied_scores(structure: Structure, value: float = 1.0) -> list[LayerScores]:
    return [LayerScores(torch.full((s.num_heads,), value), torch.full((s.num_kv_heads,), value),
                        torch.full((s.intermediate,), value)) for s in structure.layers]


def test_unit_selection_keeps_the_lower_index_among_equal_scores():
    structure = Structure.of(tiny_model("llama"))  # 6 query heads in 3 kv groups, 48 channels, 4 layers
    scores = _tied_scores(structure)
    masks = masks_from_counts(structure, scores, {0: KeepCounts(2, 16)}, "kv-group")
    assert masks.kv_heads(0, structure).tolist() == [True, True, False]
    assert masks.channels[0].tolist() == [True] * 16 + [False] * 32
    per_group = masks_from_counts(structure, scores, {1: KeepCounts(1, 48)}, "q-head")
    assert per_group.heads[1].tolist() == [True, False] * 3  # the first query head of every group
    # ties among the units still allowed: a unit already removed stays removed, the next lower index wins
    later = masks_from_counts(structure, scores, {0: KeepCounts(1, 8)}, "kv-group", current=masks)
    assert later.kv_heads(0, structure).tolist() == [True, False, False]
    masks.channels[0][0] = False
    later = masks_from_counts(structure, scores, {0: KeepCounts(2, 8)}, "kv-group", current=masks)
    assert later.channels[0].nonzero().flatten().tolist() == list(range(1, 9))
    # a strictly better score wins over a lower index
    scores[0].channels[40] = 2.0
    assert masks_from_counts(structure, scores, {0: KeepCounts(3, 2)},
                             "kv-group").channels[0].nonzero().flatten().tolist() == [0, 40]


def test_global_ranking_keeps_the_lower_layer_among_equal_scores():
    structure = Structure.of(tiny_model("llama"))
    counts = global_counts(structure, _tied_scores(structure), 0.5, [0, 1, 2, 3], ("channels",), round_to=8)
    # the uniform total (24 of 48 channels in each of 4 layers = 96) goes to the lowest layers first
    assert [counts[i].channels for i in range(4)] == [48, 48, 8, 8]  # round_count keeps at least one multiple
