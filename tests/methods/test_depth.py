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


def test_loraprune_refuses_layers_with_one_line():
    with pytest.raises(SettingError, match="one-shot criteria"):
        PruneSettings(method="loraprune", units="heads,layers").check()
    with pytest.raises(SettingError, match="heads, channels, layers"):
        PruneSettings(method="taylor", units="experts").check()


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
