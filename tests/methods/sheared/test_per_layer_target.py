"""Per-layer targets: Sheared-LLaMA's masks aimed at the shape of a model pruned layer by layer
(`prunetune_layer_shapes` in its config.json), each layer cut to its own heads and channels."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_user_error, masked_then_cut, run_cli
from tiny import ARCHITECTURES, tiny_model, tokens

from prunetune.errors import UserError
from prunetune.methods.sheared.hard_concrete import HardConcrete
from prunetune.methods.sheared.l0_masks import ShearMasks
from prunetune.methods.sheared.target import parse_target, target_parameters
from prunetune.models import load_model
from prunetune.structure.units import Structure, count_parameters

# The tiny sources: 4 layers, hidden 96, 6 heads over 3 kv heads, MLP 48. Layer 0 whole, layer 1 only
# narrower, layer 2 one key/value group fewer and narrower, layer 3 whole: gated rows beside whole ones.
SHAPES = [(6, 3, 48), (6, 3, 16), (4, 2, 32), (6, 3, 48)]


def _target_config(tmp_path, model, shapes=SHAPES, **changes) -> str:
    config = model.config.to_dict() | changes
    config["prunetune_layer_shapes"] = [{"num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": i}
                                        for h, kv, i in shapes]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_rows_the_target_leaves_whole_are_not_gated():
    gates = HardConcrete(3, 6, keep=[6, 2, 4], groups=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gates.log_alpha.normal_(0, 3, generator=torch.Generator().manual_seed(1))
    assert gates.keep_mask().sum(-1).tolist() == [6, 2, 4]
    assert gates.keep_mask().reshape(3, 2, 3).sum(-1).tolist() == [[3, 3], [1, 1], [2, 2]]  # equal per group
    assert torch.equal(gates.sample()[0], torch.ones(6)) and torch.equal(gates.deterministic()[0], torch.ones(6))
    assert torch.equal(gates.keep_probability()[0], torch.ones(6))
    assert not torch.equal(gates.sample()[1:], torch.ones(2, 6))  # the others are sampled


def test_a_per_layer_target_reads_from_a_config_that_lists_each_layer(tmp_path):
    model = tiny_model("llama")
    structure = Structure.of(model)
    target = parse_target(_target_config(tmp_path, model), structure)
    assert target.layer_shapes() == SHAPES and target.head_unit == "kv-group"
    assert target.describe() == ("hidden=96, per layer: 1 x heads=6,kv-heads=3,intermediate=48; 1 x heads=6,"
                                 "kv-heads=3,intermediate=16; 1 x heads=4,kv-heads=2,intermediate=32; 1 x heads=6,"
                                 "kv-heads=3,intermediate=48")


@pytest.mark.parametrize("shapes, changes, message", [
    (SHAPES[:3], {"num_hidden_layers": 3}, "keeps every layer"),
    (SHAPES, {"hidden_size": 64}, "keeps every layer and the residual width"),
    ([(6, 3, 48)] * 4, {}, "the source's own shape"),
    ([(6, 3, 48), (3, 3, 48), (4, 2, 48), (6, 3, 48)], {}, "one kind"),
    ([(6, 3, 48), (5, 3, 48), (6, 3, 48), (6, 3, 48)], {}, "layer 1: target heads=5"),
    ([(6, 3, 64)] * 4, {}, "layer 0: target intermediate=64 is larger"),
])
def test_a_per_layer_target_that_cannot_be_met_is_one_line(tmp_path, shapes, changes, message):
    model = tiny_model("llama")
    with pytest.raises(UserError, match=message) as error:
        parse_target(_target_config(tmp_path, model, shapes, **changes), Structure.of(model))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masked_eval_equals_the_model_cut_to_each_layers_shape(arch, tmp_path):
    model = tiny_model(arch)
    structure = Structure.of(model)
    target = parse_target(_target_config(tmp_path, model), structure)
    masked, pruned = masked_then_cut(model, ShearMasks(structure, target, warmup_steps=0), tokens())
    assert torch.allclose(masked, pruned, atol=1e-5)
    assert [(s.num_heads, s.num_kv_heads, s.intermediate) for s in Structure.of(model).layers] == SHAPES
    assert count_parameters(model)["total"] == target_parameters(target, structure)


def test_shear_to_the_shape_of_a_model_pruned_layer_by_layer(model_dir, tmp_path):
    source, _ = load_model(str(model_dir))
    target = _target_config(tmp_path, source)
    done = run_cli("shear", str(model_dir), "--target", target, "--data", "prose=builtin:pydoc", "--steps", "2",
                   "--batch-size", "2", "--seq-len", "32", "--eval-seq-len", "32", "--no-eval",
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / "prunetune.json").read_text())
    assert [tuple(s.values()) for s in record["architecture"]["layer_shapes"]] == SHAPES
    assert record["parameters"]["after"]["total"] == record["parameters"]["target"]
    assert record["checks"]["masked_vs_cut_max_abs_logit_diff"] < 1e-4
    sheared, _ = load_model(str(tmp_path / "out"))
    assert [(s.num_heads, s.num_kv_heads, s.intermediate) for s in Structure.of(sheared).layers] == SHAPES


def test_a_per_layer_target_of_another_depth_is_one_line_and_leaves_nothing(model_dir, tmp_path, no_model_load):
    source = tiny_model("llama")
    target = _target_config(tmp_path, source, SHAPES[:3], num_hidden_layers=3)
    done = run_cli("shear", str(model_dir), "--target", target, "--steps", "2", "--out", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert_user_error(done, "keeps every layer")
    assert not (tmp_path / "out").exists()
