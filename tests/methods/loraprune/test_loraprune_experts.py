"""LoRAPrune on a mixture of experts: LoRA on the fused expert parameters, experts and expert channels
pruned progressively as the adapter trains. The masked adapted model computes what the merged, cut
one does; pruned experts and channels never come back; an expert no token reaches scores nothing and
goes first; a resumed run ends where an uninterrupted one does; the CLI's run loads in stock
transformers, from a quantized base too; a dropout PEFT cannot apply is refused in one line."""

import json

import pytest
import torch
from helpers import assert_resume_matches
from tiny import MOE_FAMILIES, WIDE, moe_masks, save_tiny_model_dir, tiny_model, tokens

from prunetune.importance.lora_guided import lora_guided_scores
from prunetune.methods.loraprune.pruner import LoRAPruner, LoRAPruneSettings
from prunetune.structure.experts import count_routing, expert_hooks
from prunetune.structure.masks import Masks, MaskHooks, apply_masks
from prunetune.structure.surgery import cut, merge_lora
from prunetune.structure.units import Structure, decoder_layers, moe_parts
from prunetune.training.lora import LoraSettings, add_lora
from prunetune.training.loop import TrainSettings, train

TOL = 1e-4
UNITS = ("heads", "experts", "expert-channels")


def _adapted(arch: str, seed: int = 0):
    """A tiny mixture with LoRA on attention and on the experts, its B matrices random (not zero)."""
    model = tiny_model(arch)
    structure = Structure.of(model)
    torch.manual_seed(seed)
    model = add_lora(model, LoraSettings(), experts=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, structure


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_masked_lora_on_experts_equals_the_merged_cut_model(arch):
    model, structure = _adapted(arch)
    masks = moe_masks(structure, heads=False)
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        with apply_masks(model, masks):
            masked = model(x).logits
        assert (masked - full).abs().max() > 1e-3
        torch.testing.assert_close(model(x).logits, full, atol=0, rtol=0)  # the masks leave nothing behind
        cut(model, masks)  # folds the experts' adapters in, then cuts
        assert moe_parts(decoder_layers(model)[0])[1].gate_up_proj.shape[0] == 4
        after = merge_lora(model)(x).logits
    torch.testing.assert_close(after, masked, atol=TOL, rtol=0)


def test_the_adapters_delta_is_masked_too_not_only_the_weight():
    """The zeroed gate rows are those of W + s·B·A: with W's rows zero, a channel would still pass
    its adapter's share."""
    model, structure = _adapted("mixtral")
    masks = Masks(expert_channels=moe_masks(structure, heads=False).expert_channels)
    x = tokens()
    with torch.no_grad():
        with apply_masks(model, masks):
            masked = model(x).logits
        for i, layer in enumerate(decoder_layers(model)):
            experts = moe_parts(layer)[1]
            width = experts.down_proj.shape[2]
            experts.gate_up_proj[:, :width][~masks.expert_channels[i]] = 0  # the base weight's rows only
        base_only = model(x).logits
    assert (base_only - masked).abs().max() > 1e-4


def _pruner(model, structure, steps: int, **settings):
    return LoRAPruner(model, structure, ratio=0.4, layers=list(range(structure.num_layers)), units=UNITS,
                      head_unit="kv-group", round_to=4, allocation="uniform",
                      settings=LoRAPruneSettings(**({"prune_every": 2} | settings)), total_steps=steps)


def _blocks():
    blocks = torch.randint(0, 96, (40, 16), generator=torch.Generator().manual_seed(0))
    return blocks, torch.ones_like(blocks, dtype=torch.bool)


def test_progressive_expert_masks_never_revive_and_reach_the_chosen_counts():
    model = tiny_model("qwen3_moe")
    structure = Structure.of(model)
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(), experts=True)
    pruner = _pruner(model, structure, 20)
    seen: list[Masks] = []
    apply = pruner._apply
    pruner._apply = lambda masks: (seen.append(masks), apply(masks))
    blocks, mask = _blocks()
    train(model, blocks, mask, TrainSettings(steps=20, batch_size=4, seq_len=16, lr=5e-3), hooks=pruner,
          progress=False)
    final = pruner.finish()
    assert len(seen) >= 4
    for earlier, later in zip(seen, seen[1:]):
        for i in range(structure.num_layers):
            for kind in ("heads", "experts", "expert_channels"):
                a, b = getattr(earlier, kind).get(i), getattr(later, kind).get(i)
                if a is not None:
                    assert b is not None and not (b & ~a).any(), f"a pruned {kind} unit came back"
    removed = pruner.experts["experts_removed_per_layer"]
    assert removed >= 1 and any(len(m.experts) and int((~m.experts[0]).sum()) < removed for m in seen)  # one by one
    for i in range(structure.num_layers):
        assert int((~final.experts[i]).sum()) == removed
        width = (int(final.expert_channels[i][0].sum()) if i in final.expert_channels
                 else structure.layers[i].intermediate)
        assert width == pruner.experts["expert_width"]
    candidates = pruner.experts["candidates"]
    assert min(c["pruned_score"] for c in candidates) == next(
        c["pruned_score"] for c in candidates if c["experts_removed_per_layer"] == removed)
    # the frozen experts never got a gradient: their scores came from the adapters alone
    experts = moe_parts(decoder_layers(model)[0])[1]
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None


def test_an_expert_no_token_reaches_scores_nothing_and_goes_first():
    """Zero exactly where the routers picked an expert no time: the removed expert 5, and any kept
    expert this small batch happens to miss (which one depends on the adapter's random start)."""
    model, structure = _adapted("olmoe")
    switch = MaskHooks()
    kept = torch.tensor([True] * 5 + [False])  # the router never picks expert 5
    handles = [h for layer in decoder_layers(model) for h in expert_hooks(layer, kept, None, switch)]
    x = tokens()
    with count_routing(model) as routing:
        model(input_ids=x, labels=x).loss.backward()
    scores = lora_guided_scores(model, normalize=False)
    for handle in handles:
        handle.remove()
    for layer, counts in zip(scores, routing.counts, strict=True):
        assert counts[5] == 0 and counts[:5].sum() > 0
        torch.testing.assert_close(layer.experts > 0, counts > 0, atol=0, rtol=0)
        assert (layer.expert_channels[counts == 0] == 0).all()


def test_a_resumed_run_on_a_mixture_ends_where_an_uninterrupted_one_does(tmp_path):
    def fresh():
        model = tiny_model("mixtral")
        structure = Structure.of(model)
        torch.manual_seed(0)
        model = add_lora(model, LoraSettings(), experts=True)
        return model, structure, _pruner(model, structure, 12, prune_every=3)

    blocks, mask = _blocks()
    settings = TrainSettings(steps=12, batch_size=2, seq_len=16, checkpoint_every=4, lr=5e-3)
    pruner = assert_resume_matches(fresh, blocks, mask, settings, tmp_path, stop_after=10, resumed_from=8)
    assert pruner.experts is not None


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("mixtral") / "model", "mixtral")


def test_loraprune_on_a_mixture_end_to_end_records_its_choice_and_loads_in_stock_transformers(mixtral_dir, tmp_path):
    from helpers import run_cli
    from transformers import AutoModelForCausalLM

    from prunetune.families import family_of

    out = tmp_path / "pruned"
    done = run_cli("prune", mixtral_dir, "--method", "loraprune", "--units", ",".join(UNITS), "--ratio", "0.4",
                   "--round-to", "4", "--batch-size", "2", "--seq-len", "32", "--eval-seq-len", "64",
                   "--max-windows", "2", "--steps", "12", "--prune-every", "2", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "prunetune.json").read_text())
    assert record["settings"]["lora"]["dropout"] == 0.0  # PEFT's LoRA on the experts takes none
    routing = record["experts"]["routing"]["pruning"]
    assert routing["tokens"] == 12 * 2 * 32  # the training passes only, not the self-teacher's
    assert sum(routing["counts"][0]) == 2 * routing["tokens"]
    budget = record["experts"]["budget"]
    assert all("pruned_score" in c for c in budget["candidates"])
    assert abs(record["parameters"]["ratio_achieved"] - 0.4) < 0.08
    schedule = [h["kept"] for h in record["training"]["schedule"]]
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))
    kept = record["kept"]["layers"][0]["num_experts"]
    assert kept == 6 - budget["experts_removed_per_layer"]
    report = (out / "report.md").read_text()
    assert "LoRAPrune's training routed" in report and "score removed" in report
    stock = AutoModelForCausalLM.from_pretrained(out)
    layout = family_of(stock).moe
    assert getattr(stock.config, layout.count_key) == kept
    assert layout.experts(stock.model.layers[0]).down_proj.shape[2] == budget["expert_width"]


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_loraprune_on_a_quantized_mixture_saves_a_dense_model(quant, tiny_model_dir, tmp_path):
    """A quantized base (its attention projections: bitsandbytes leaves the experts' fused parameters,
    which are not Linear layers), the units unset (the family's): the saved model is dense, cut to the
    chosen expert count and width, and loads in stock transformers. Hidden 128, so that NF4's CPU
    kernels apply (they need whole 64-wide blocks per row)."""
    from transformers import AutoModelForCausalLM

    from prunetune.families import family_of
    from prunetune.methods.prune import PruneSettings, prune
    from prunetune.runs.settings import EvalSettings, RunOptions

    out = tmp_path / quant
    wide = {k: v for k, v in WIDE.items() if k != "intermediate_size"}  # the experts stay 32 wide
    record = prune(str(tiny_model_dir("mixtral", **wide)), out, PruneSettings(ratio=0.4, round_to=4),
                   EvalSettings(data=None), RunOptions(training=TrainSettings(steps=4, batch_size=2, seq_len=32),
                                                       quant=quant, progress=False), log=lambda _: None)
    assert record["settings"]["units"] == ",".join(UNITS) and record["settings"]["quant"] == quant
    assert record["training"]["settings"]["lr"] == 5e-4  # unset: LoRA's measured rate
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    stock = AutoModelForCausalLM.from_pretrained(out)
    layout = family_of(stock).moe
    budget = record["experts"]["budget"]
    assert getattr(stock.config, layout.count_key) == 6 - budget["experts_removed_per_layer"]
    assert layout.experts(stock.model.layers[0]).down_proj.shape[2] == budget["expert_width"]


def test_a_dropout_lora_on_experts_cannot_take_is_refused_in_one_line(mixtral_dir, tmp_path):
    from helpers import assert_user_error, run_cli

    out = tmp_path / "pruned"
    done = run_cli("prune", mixtral_dir, "--method", "loraprune", "--units", ",".join(UNITS), "--lora-dropout", "0.1",
                   "--steps", "2", "--out", out, cwd=tmp_path)
    assert_user_error(done, "--lora-dropout", "no dropout")
    assert not out.exists()


def test_loraprune_removes_whole_layers_of_a_mixture_scored_with_their_experts():
    model = tiny_model("qwen3_moe")
    structure = Structure.of(model)
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(), experts=True)
    pruner = LoRAPruner(model, structure, ratio=0.5, layers=list(range(structure.num_layers)), units=("layers",),
                        head_unit="kv-group", round_to=4, allocation="uniform",
                        settings=LoRAPruneSettings(prune_every=2), total_steps=8)
    blocks, mask = _blocks()
    train(model, blocks, mask, TrainSettings(steps=8, batch_size=4, seq_len=16, lr=5e-3), hooks=pruner,
          progress=False)
    masks = pruner.finish()
    assert int((~masks.layers).sum()) == 2
    # a layer's score counts its experts (through their channels), not its attention alone
    layer = pruner.average[0]
    assert layer.total() > float(layer.q_heads.sum() + layer.kv_heads.sum())
    x = tokens()
    with torch.no_grad():
        with apply_masks(model, masks):
            masked = model(x).logits
        after = merge_lora(cut(model, masks))(x).logits
    torch.testing.assert_close(after, masked, atol=TOL, rtol=0)
