"""The methods' own pieces on every family, at the adapter's seams: Sheared-LLaMA's learned masks
(masked == folded and cut, the target's parameter count exact), every criterion's scores, and the
planner's count of what a cut keeps."""

import pytest
import torch
from helpers import masked_then_cut
from tiny import FAMILIES, NoTokenizer, tiny_model, tokens
from transformers import AutoModelForCausalLM

from prunetune.export.hf import save_model
from prunetune.families import family_of
from prunetune.importance import CRITERIA
from prunetune.methods.sheared.l0_masks import ShearMasks
from prunetune.methods.sheared.target import parse_target, target_parameters
from prunetune.structure.units import Structure, count_parameters

# kv-group heads, channels and layers everywhere; hidden channels where the family allows them
WITH_HIDDEN = "layers=3,hidden=64,heads=4,kv-heads=2,intermediate=32"
WITHOUT_HIDDEN = "layers=3,hidden=96,heads=4,kv-heads=2,intermediate=32"


@pytest.mark.parametrize("arch", FAMILIES)
def test_sheared_masks_equal_the_folded_and_cut_model(arch, tmp_path):
    model = tiny_model(arch)
    structure = Structure.of(model)
    target = parse_target(WITHOUT_HIDDEN if family_of(model).no_hidden_cut else WITH_HIDDEN, structure)
    x = tokens()
    masked, pruned = masked_then_cut(model, ShearMasks(structure, target, warmup_steps=10), x)
    assert (masked - pruned).abs().max() <= 1e-4
    assert count_parameters(model)["total"] == target_parameters(target, structure)
    save_model(model, NoTokenizer(), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (loaded(x).logits - pruned).abs().max() <= 1e-4


def test_a_family_that_scales_its_embeddings_refuses_a_hidden_target():
    from prunetune.errors import SettingError
    from prunetune.methods.sheared.domain_training import DomainSettings
    from prunetune.methods.sheared.shear import ShearSettings, shear
    from prunetune.runs.settings import EvalSettings

    from tiny import save_tiny_model_dir

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        source = save_tiny_model_dir(Path(tmp) / "gemma", "gemma2")
        with pytest.raises(SettingError, match="hidden size cannot be pruned"):
            shear(str(source), Path(tmp) / "out", ShearSettings(target=WITH_HIDDEN), DomainSettings(),
                  EvalSettings(data=None))
        assert not (Path(tmp) / "out").exists()


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda-sp", "random"])
def test_every_criterion_scores_every_unit(arch, criterion):
    model = tiny_model(arch)
    structure = Structure.of(model)
    scores = CRITERIA[criterion](model, [tokens(batch=2, length=16)], seed=0)
    assert len(scores) == structure.num_layers
    for layer_scores, shape in zip(scores, structure.layers):
        assert layer_scores.q_heads.shape == (shape.num_heads,)
        assert layer_scores.kv_heads.shape == (shape.num_kv_heads,)
        assert layer_scores.channels.shape == (shape.intermediate,)
        assert torch.isfinite(layer_scores.channels).all() and torch.isfinite(layer_scores.q_heads).all()


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_planner_predicts_the_measured_peak(arch):
    from tiny import tiny_config

    from prunetune.plan import PlanSettings, plan_method
    from prunetune.plan.measure import measure_method

    config = tiny_config(arch)
    settings = PlanSettings(method="loraprune", batch_size=2, seq_len=32, dtype="float32")
    if family_of(config).uniform_only:
        settings.layers = "all"
    plan = plan_method(config, settings)
    measured = measure_method(config, settings)
    assert set(measured) == set(plan["steps"])
    for step, value in measured.items():
        assert plan["steps"][step]["peak"] == pytest.approx(value, rel=0.03), step
