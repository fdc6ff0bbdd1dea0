"""Mixtures of experts (Mixtral, Qwen3-MoE, OLMoE) on tiny random models: experts and expert channels
as units. A masked model computes what the cut one does, the cut one loads in stock transformers with
the same logits, the router never picks a removed expert and keeps its top-k, every criterion scores
experts, a never-routed expert goes first, LoRA merges, and the methods that do not prune experts
refuse in one line."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import MOE_FAMILIES, moe_masks, save_tiny_model_dir, tiny_model, tokens

from prunetune.errors import SettingError, UserError
from prunetune.families import check_supported, family_of
from prunetune.importance import CRITERIA
from prunetune.methods.expert_budget import expert_counts, width_masks
from prunetune.structure.experts import count_routing, removal_order, routing_on
from prunetune.structure.masks import Masks, apply_masks
from prunetune.structure.surgery import cut, merge_lora
from prunetune.structure.units import Structure

TOL = 1e-4
SCORED = ("magnitude", "taylor", "wanda-sp", "random", "lora-guided")


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_structure_reads_experts_width_and_top_k(arch):
    model = tiny_model(arch)
    assert check_supported(model.config).moe is not None
    structure = Structure.of(model)
    assert {(s.experts, s.intermediate) for s in structure.layers} == {(6, 32)}
    assert structure.top_k == 2
    # every expert weight and router row is prunable, and nothing else of the MLP
    block = f".{family_of(model).moe.block_path}."
    experts = sum(p.numel() for n, p in model.named_parameters() if block in n)
    assert structure.prunable_params(units=("experts",)) == experts


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_masked_experts_equal_the_cut_model_and_stock_transformers_loads_it(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    heads = family_of(model).no_head_cut is None  # OLMoE keeps its heads
    masks = moe_masks(Structure.of(model), heads)
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        with apply_masks(model, masks):
            masked = model(x).logits
        assert (masked - full).abs().max() > 1e-3  # the masks do something
        cut(model, masks)
        after = model(x).logits
    torch.testing.assert_close(after, masked, atol=TOL, rtol=0)
    layout = family_of(model).moe
    assert getattr(model.config, layout.count_key) == 4 and getattr(model.config, layout.width_key) == 20
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, after, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_a_mixture_with_whole_layers_removed_equals_its_masked_self(arch):
    model = tiny_model(arch)
    masks = Masks(layers=torch.tensor([True, False, True, False]))
    x = tokens()
    with torch.no_grad():
        with apply_masks(model, masks):
            masked = model(x).logits
        after = cut(model, masks)(x).logits
    torch.testing.assert_close(after, masked, atol=TOL, rtol=0)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_masked_router_never_picks_a_removed_expert(arch):
    model = tiny_model(arch)
    masks = moe_masks(Structure.of(model), heads=False)
    with apply_masks(model, masks), count_routing(model) as routing, torch.no_grad():
        model(tokens(batch=4, length=16))
    for i, counts in enumerate(routing.counts):
        assert counts[~masks.experts[i]].sum() == 0
        assert counts.sum() == routing.tokens * 2  # still top-2 for every token
    assert routing.tokens == 4 * 16


@pytest.mark.parametrize("criterion", SCORED)
@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_every_criterion_scores_experts_and_their_channels(arch, criterion):
    model = tiny_model(arch)
    before = {n: p.clone() for n, p in model.named_parameters()}
    scores = CRITERIA[criterion](model, [tokens()])
    for layer in scores:
        assert layer.experts.shape == (6,) and layer.expert_channels.shape == (6, 32)
        assert layer.channels.numel() == 0  # no dense MLP
        assert torch.isfinite(layer.experts).all() and (layer.experts > 0).any()
    for name, p in model.named_parameters():  # scoring changes nothing
        assert torch.equal(p, before[name]) and p.grad is None, name


def test_a_never_routed_expert_goes_first_whatever_its_score():
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0])
    assert removal_order(scores, torch.tensor([4, 0, 7, 9]))[:2] == [1, 0]
    assert removal_order(scores, None) == [0, 2, 3, 1]


def test_routing_counts_a_checkpointed_training_pass_once():
    """A checkpointed layer runs its router again during the backward; that is not another pass."""
    from prunetune.training.loop import enable_checkpointing

    model = tiny_model("qwen3_moe")
    enable_checkpointing(model)
    model.train()
    x = tokens()
    with count_routing(model, with_grad_only=True) as routing:
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        with torch.no_grad():
            model(input_ids=x, use_cache=False)  # a teacher's or an evaluation's pass: not counted
    assert model.model.layers[0].mlp.gate.weight.grad is not None  # the backward did run
    assert routing.tokens == x.numel()
    assert all(int(c.sum()) == 2 * x.numel() for c in routing.counts)  # top-2, once


@pytest.mark.parametrize("criterion", ["taylor", "lora-guided"])
def test_gradient_criteria_give_an_unrouted_expert_nothing(criterion):
    model = tiny_model("mixtral")
    batches = [tokens(batch=1, length=2)]  # two tokens, top-2 of six experts: some never picked
    routing = routing_on(model, batches)
    assert any((counts == 0).any() for counts in routing.counts)  # the check below means something
    scores = CRITERIA[criterion](model, batches)
    for counts, layer in zip(routing.counts, scores):
        # no gradient reaches an unrouted expert's weights (its router row still gets a trace of one)
        assert (layer.expert_channels[counts == 0] == 0).all() and (layer.experts[counts > 0] > 0).any()


@pytest.mark.parametrize("units", [("experts",), ("experts", "expert-channels"),
                                   ("heads", "experts", "expert-channels"),
                                   ("heads", "expert-channels")])
def test_every_budget_candidate_lands_near_the_ratio_and_keeps_top_k(units):
    model = tiny_model("qwen3_moe", moe_intermediate_size=64)
    structure = Structure.of(model)
    scores = CRITERIA["magnitude"](model)
    layers = list(range(structure.num_layers))
    counts = expert_counts(structure, 0.4, layers, units)
    assert counts and all(0 <= k <= 4 for k in counts)
    for removed in counts:
        masks, fields = width_masks(structure, scores, None, 0.4, layers, units, removed, "kv-group", 4, "uniform",
                                    "cost")
        masks.validate(structure)
        from prunetune.structure.allocate import achieved_ratio

        achieved = achieved_ratio(structure, masks, layers, units)
        assert abs(achieved - 0.4) < (0.15 if units == ("experts",) else 0.08), (removed, fields, achieved)


def test_masks_keep_top_k_and_one_width_or_are_refused():
    structure = Structure.of(tiny_model("mixtral"))
    too_few = Masks(experts={0: torch.tensor([True, False, False, False, False, False])})
    with pytest.raises(ValueError, match="fewer than the 2"):
        too_few.validate(structure)
    ragged = torch.ones(6, 32, dtype=torch.bool)
    ragged[0, :3] = False
    with pytest.raises(ValueError, match="same number of channels"):
        Masks(expert_channels={1: ragged}).validate(structure)
    per_layer = Masks(experts={0: torch.tensor([True, True, True, True, False, False])})
    with pytest.raises(ValueError, match="different expert counts or widths"):
        per_layer.validate(structure)


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_merged_lora_equals_unmerged_on_the_cut_mixture(arch):
    model = cut(tiny_model(arch), moe_masks(Structure.of(tiny_model(arch)), heads=False))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        x = tokens()
        unmerged = peft_model(x).logits
        merged = merge_lora(peft_model)(x).logits
    torch.testing.assert_close(merged, unmerged, atol=TOL, rtol=0)


def test_a_qwen3_moe_with_dense_layers_is_refused_in_one_line():
    config = tiny_model("qwen3_moe").config
    config.mlp_only_layers = [1]
    with pytest.raises(UserError, match="dense MLP instead of experts"):
        check_supported(config)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("mixtral") / "model", "mixtral")


@pytest.mark.parametrize("arch", [
    "mixtral", *(pytest.param(a, marks=pytest.mark.slow) for a in MOE_FAMILIES if a != "mixtral")])  # make test-slow
def test_prune_a_mixture_end_to_end_records_routing_and_loads_in_stock_transformers(arch, mixtral_dir, tmp_path):
    from helpers import run_cli
    from transformers import AutoModelForCausalLM

    source = mixtral_dir if arch == "mixtral" else save_tiny_model_dir(tmp_path / arch, arch)
    out = tmp_path / "pruned"
    done = run_cli("prune", source, "--method", "taylor", "--ratio",  # the units unset: the family's
                   "0.4", "--round-to", "4", "--batch-size", "2", "--seq-len", "32", "--eval-seq-len", "64",
                   "--max-windows", "2", "--calib-samples", "4", "--recover-steps", "2", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "prunetune.json").read_text())
    assert record["settings"]["units"] == ("experts,expert-channels" if arch == "olmoe"
                                           else "heads,experts,expert-channels")
    routing = record["experts"]["routing"]
    assert sum(routing["calibration"]["counts"][0]) == 2 * routing["calibration"]["tokens"]
    kept = record["kept"]["layers"][0]["num_experts"]
    assert all(len(c) == kept for c in routing["training"]["counts"])  # the cut model's experts
    assert len(record["experts"]["budget"]["candidates"]) >= 2
    assert abs(record["parameters"]["ratio_achieved"] - 0.4) < 0.08
    report = (out / "report.md").read_text()
    assert "## Experts" in report and "routing.png" in report
    assert (out / "run" / "plots" / "routing.png").is_file()
    stock = AutoModelForCausalLM.from_pretrained(out)
    layout = family_of(stock).moe
    assert getattr(stock.config, layout.count_key) == kept
    assert layout.experts(stock.model.layers[0]).gate_up_proj.shape[0] == kept


@pytest.mark.parametrize("arch, method, units, message", [
    ("phimoe", "loraprune", "heads,channels", "not channels"),
    ("qwen3_moe", "taylor", "heads,channels", "not channels"),
    ("mixtral", "taylor", "layers,experts", "layers prunes a mixture of experts alone"),
    ("olmoe", "taylor", "heads,experts", "heads cannot be pruned"),
    ("llama", "taylor", "heads,experts", "has no experts"),
])
def test_settings_a_model_cannot_take_are_refused_before_loading(arch, method, units, message):
    from prunetune.methods.prune import PruneSettings, _check_family

    with pytest.raises(SettingError, match=message):
        _check_family(tiny_model(arch).config, PruneSettings(method=method, units=units))


@pytest.mark.parametrize("arch, units", [
    ("llama", "heads,channels"), ("mixtral", "heads,experts,expert-channels"), ("olmoe", "experts,expert-channels")])
def test_unset_units_are_the_familys(arch, units):
    """A user who brings a mixture of experts and names no units prunes what that model has."""
    from prunetune.methods.prune import PruneSettings, _check_family

    settings = PruneSettings(method="taylor")
    settings.check()
    _check_family(tiny_model(arch).config, settings)
    assert settings.units == units


def test_the_planner_refuses_a_mixture_for_a_method_that_refuses_it():
    """lora, loraprune, taylor and train plan a mixture (tests/plan/test_plan.py); LoRAM does not prune one."""
    from tiny import tiny_config

    from prunetune.plan import PlanSettings, plan_method

    with pytest.raises(UserError, match="mixture of experts, which loram does not prune or train"):
        plan_method(tiny_config("mixtral"), PlanSettings(method="loram"))


def test_shear_refuses_a_mixture_in_one_line_and_writes_nothing(mixtral_dir, tmp_path):
    from helpers import assert_user_error, run_cli

    out = tmp_path / "sheared"
    done = run_cli("shear", mixtral_dir, "--target", "heads=3", "--out", out, "--steps", "1", cwd=tmp_path)
    assert_user_error(done, "mixture of experts", "prunetune prune")
    assert not out.exists()
