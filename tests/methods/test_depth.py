"""Whole layers as a unit (`--units layers`): the least influential layers go, alone or with heads and
channels (the split with the lowest calibration loss wins), and the result is a stock model with fewer
layers for every family."""

import json

import pytest
import torch
from tiny import FAMILIES, NoTokenizer, tiny_model, tokens
from transformers import AutoModelForCausalLM

from prunetune.errors import SettingError
from prunetune.export.hf import save_model
from prunetune.families import family_of
from prunetune.methods.prune import PruneSettings, prune
from prunetune.runs.settings import EvalSettings, RunOptions
from prunetune.structure.depth import depth_counts, removal_order
from prunetune.structure.masks import Masks, apply_masks
from prunetune.structure.surgery import cut
from prunetune.structure.units import Structure
from prunetune.training.loop import TrainSettings


def _prune(source, out, **settings):
    options = RunOptions(training=TrainSettings(batch_size=2, seq_len=16), progress=False)
    return prune(str(source), out, PruneSettings(**settings), EvalSettings(data=None), options, log=lambda _: None)


def test_layers_alone_remove_the_least_influential_and_save_a_stock_model(tiny_model_dir, tmp_path):
    record = _prune(tiny_model_dir("llama", num_hidden_layers=6), tmp_path / "out", method="magnitude",
                    units="layers", ratio=0.34)
    depth = record["depth"]
    assert len(depth["layers_removed"]) == 2  # a third of six equal layers
    ranked = sorted(range(6), key=lambda i: (depth["influence"][i], -i))
    assert depth["layers_removed"] == sorted(ranked[:2])
    assert record["parameters"]["ratio_achieved"] == pytest.approx(2 / 6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4
    assert [e["layer"] for e in record["kept"]["layers"]] == [i for i in range(6) if i not in depth["layers_removed"]]


def test_depth_and_width_together_take_the_split_with_the_lowest_calibration_loss(tiny_model_dir, tmp_path):
    record = _prune(tiny_model_dir("llama", num_hidden_layers=6), tmp_path / "out", method="taylor",
                    units="heads,channels,layers", ratio=0.4, round_to=1)
    candidates = record["depth"]["candidates"]
    assert [len(c["layers_removed"]) for c in candidates] == [0, 1, 2]  # up to what 40% allows
    best = min(candidates, key=lambda c: c["calibration_loss"])
    assert record["depth"]["layers_removed"] == best["layers_removed"]
    assert record["parameters"]["ratio_achieved"] == pytest.approx(0.4, abs=0.03)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # one shape in every remaining layer: stock
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6 - len(
        best["layers_removed"])


def test_depth_counts_reach_the_ratio_and_never_every_layer():
    structure = Structure.of(tiny_model("llama"))
    influence = torch.tensor([0.5, 0.1, 0.3, 0.2])
    assert removal_order(influence, [0, 1, 2, 3]) == [1, 3, 2, 0]
    assert depth_counts(structure, influence, 0.5, [0, 1, 2, 3], with_width=False) == [2]
    assert depth_counts(structure, influence, 0.99, [0, 1, 2, 3], with_width=False) == [3]
    assert depth_counts(structure, influence, 0.1, [0, 1, 2, 3], with_width=False) == [1]
    assert depth_counts(structure, influence, 0.6, [0, 1, 2, 3], with_width=True) == [0, 1, 2]


def test_an_unknown_unit_kind_is_one_line():
    with pytest.raises(SettingError, match="heads, channels, layers, experts, expert-channels"):
        PruneSettings(method="taylor", units="blocks").check()


def test_loraprune_with_layers_removes_the_least_important_along_its_schedule(tiny_model_dir, tmp_path):
    options = RunOptions(training=TrainSettings(batch_size=2, seq_len=16, steps=12), progress=False)
    record = prune(str(tiny_model_dir("llama", num_hidden_layers=6)), tmp_path / "out",
                   PruneSettings(method="loraprune", units="heads,channels,layers", ratio=0.4, round_to=1,
                                 layers="all"), EvalSettings(data=None), options, log=lambda _: None)
    depth = record["depth"]
    best = min(depth["candidates"], key=lambda c: c["pruned_score"])
    assert depth["layers_removed"] == best["layers_removed"]
    assert [len(c["layers_removed"]) for c in depth["candidates"]] == [0, 1, 2]
    ranked = sorted(range(6), key=lambda i: (depth["scores"][i], -i))
    assert depth["layers_removed"] == sorted(ranked[:len(depth["layers_removed"])])
    assert record["parameters"]["ratio_achieved"] == pytest.approx(0.4, abs=0.03)
    kept = [h["kept"] for h in record["training"]["schedule"]]
    assert kept == sorted(kept, reverse=True)  # the schedule only ever removes
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6 - len(depth["layers_removed"])


def test_a_resumed_loraprune_with_layers_ends_where_an_uninterrupted_one_does():
    from prunetune.methods.loraprune.pruner import LoRAPruner, LoRAPruneSettings
    from prunetune.structure.scores import LayerScores

    model = tiny_model("llama", num_hidden_layers=6)
    structure = Structure.of(model)

    def pruner():
        return LoRAPruner(model, structure, ratio=0.4, layers=list(range(6)), units=("heads", "channels", "layers"),
                          head_unit="kv-group", round_to=4, allocation="uniform", settings=LoRAPruneSettings(),
                          total_steps=20)

    g = torch.Generator().manual_seed(0)
    average = [LayerScores(torch.rand(6, generator=g), torch.rand(3, generator=g), torch.rand(48, generator=g) * 4)
               for _ in range(6)]
    average[2] = LayerScores(average[2].q_heads * 1e-3, average[2].kv_heads * 1e-3, average[2].channels * 1e-3)
    first = pruner()
    first.average = average
    first.update_masks(4)
    assert 2 in first.depth["layers_removed"]  # the layer that hardly matters goes
    resumed = pruner()
    resumed.load_state_dict(first.state_dict())
    for p in (first, resumed):
        p.update_masks(10)
    assert resumed.masks.kept_summary(structure) == first.masks.kept_summary(structure)
    assert not first.finish().layer_kept(2)
    resumed.finish()


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_model_with_layers_removed_loads_in_stock_transformers(arch, tmp_path):
    model = tiny_model(arch)
    x = tokens()
    masks = Masks(layers=torch.tensor([True, False, True, False]))
    with torch.no_grad(), apply_masks(model, masks):
        masked = model(x).logits
    cut(model, masks)
    save_model(model, NoTokenizer(), tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert stock.config.num_hidden_layers == 2 and family_of(stock.config) is family_of(model)
    with torch.no_grad():
        assert (stock(x).logits - masked).abs().max() <= 1e-4


def test_a_ratio_no_depth_and_width_mix_can_reach_is_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(SettingError, match="no number of whole layers"):
        _prune(tiny_model_dir("llama"), tmp_path / "out", method="magnitude", units="channels,layers", ratio=0.9)
    assert not (tmp_path / "out").exists()
