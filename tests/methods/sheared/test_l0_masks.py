"""Sheared-LLaMA's learned masks: masked eval == folded and cut model, sampling, gradients, Lagrangian."""

import dataclasses

import pytest
import torch
from helpers import masked_then_cut
from tiny import ARCHITECTURES, NoTokenizer, tiny_model, tokens
from transformers import AutoModelForCausalLM

from prunetune.export.hf import save_model
from prunetune.errors import UserError
from prunetune.training.lora import add_lora
from prunetune.methods.sheared.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN
from prunetune.methods.sheared.l0_masks import ShearMasks
from prunetune.structure.surgery import cut
from prunetune.methods.sheared.target import Target, parse_target, target_parameters
from prunetune.structure.units import LayerShape, Structure, count_parameters
from prunetune.training.loop import enable_checkpointing

# Sources are the default tiny models: 4 layers, hidden 96, 6 heads over 3 kv heads, MLP 48.
TARGETS = {
    "kv-group": "layers=3,hidden=64,heads=4,kv-heads=2,intermediate=32",
    # 80 is not a multiple of 3 heads: a Llama of this shape is saved as Mistral.
    "q-head": "layers=3,hidden=80,heads=3,kv-heads=3,intermediate=40",
}
TARGET_MODEL = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=32)


def _shear(model, unit: str, seed: int = 0) -> tuple[ShearMasks, Target]:
    """Masks of `unit` over `model` with random log_alphas (spread over the clamp range)."""
    structure = Structure.of(model)
    target = parse_target(TARGETS[unit], structure)
    assert target.head_unit == unit
    masks = ShearMasks(structure, target, warmup_steps=10)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 2)
    return masks, target


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("unit", TARGETS)
def test_masked_eval_equals_folded_and_cut_model(arch, unit, tmp_path):
    model = tiny_model(arch)
    masks, target = _shear(model, unit)
    x = tokens()
    masked, pruned = masked_then_cut(model, masks, x, seed=None)  # _shear drew the mask logits
    assert torch.allclose(masked, pruned, atol=1e-5), (masked - pruned).abs().max()

    shape = Structure.of(model)
    assert shape.num_layers == target.layers and shape.hidden == target.hidden
    assert set(shape.layers) == {LayerShape(target.heads, target.kv_heads, target.intermediate)}

    save_model(model, NoTokenizer(), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, pruned, atol=1e-5)


def test_training_samples_eval_is_deterministic_and_gradients_reach_log_alpha():
    model = tiny_model("llama")
    masks, _ = _shear(model, "kv-group")
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.zero_()  # gates most often strictly between 0 and 1, where they have a gradient
    x = tokens()
    torch.manual_seed(0)
    with masks.attach(model):
        model.train()
        first = model(x, labels=x)
        second = model(x, labels=x)
        assert not torch.allclose(first.logits, second.logits)
        (first.loss + second.loss).backward()
        for kind, d in masks.distributions.items():
            assert d.log_alpha.grad is not None and d.log_alpha.grad.abs().sum() > 0, kind
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x).logits, model(x).logits)
    with torch.no_grad():
        unmasked = model(x).logits
    with masks.attach(model), torch.no_grad():
        assert not torch.allclose(model(x).logits, unmasked)  # the hooks act, and come off again


def _log_alpha_grads(model, masks, x):
    for p in masks.mask_parameters():
        p.grad = None
    torch.manual_seed(123)
    masks.set_rng_state(torch.Generator().manual_seed(123).get_state())  # the gates draw from their own generator
    model(x, labels=x, use_cache=False).loss.backward()
    return [p.grad.clone() for p in masks.mask_parameters()]


def test_gradient_checkpointing_sees_the_gates_of_its_forward():
    model = tiny_model("qwen3")
    masks, _ = _shear(model, "q-head")
    x = tokens()
    samples = []
    for d in masks.distributions.values():
        d.sample = (lambda sample: lambda: samples.append(1) or sample())(d.sample)
    model.train()
    with masks.attach(model):
        plain = _log_alpha_grads(model, masks, x)
        enable_checkpointing(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        checkpointed = _log_alpha_grads(model, masks, x)
    assert len(samples) == 2 * len(masks.distributions)  # once per forward, never during backward
    for a, b in zip(plain, checkpointed):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-6)


def test_masks_work_under_a_lora_wrapper():
    model = tiny_model("mistral")
    masks, _ = _shear(model, "kv-group")
    x = tokens()
    with masks.attach(model), torch.no_grad():
        plain = model(x).logits
    peft_model = add_lora(model)
    with masks.attach(peft_model):
        peft_model.eval()
        with torch.no_grad():
            assert torch.allclose(peft_model(x).logits, plain, atol=1e-6)  # LoRA B starts at zero
        peft_model.train()
        peft_model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in masks.mask_parameters())
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("unit", TARGETS)
def test_saturated_expected_parameters_count_the_cut_model(arch, unit):
    model = tiny_model(arch)
    masks, target = _shear(model, unit)
    source = Structure.of(model)
    # The official clamp keeps P(z>0) within [0.047, 0.998], so saturation is given as exact 0/1.
    saturated = {kind: d.keep_mask().float() for kind, d in masks.distributions.items()}
    expected = float(masks.expected_parameters(saturated))
    cut(model, masks.final()[0])
    real = count_parameters(model)["total"]
    assert abs(expected - real) <= 1e-3 * real
    assert target_parameters(target, source) == real


def test_expected_parameters_follow_the_probabilities():
    model = tiny_model("qwen2")
    masks, _ = _shear(model, "kv-group")
    full = count_parameters(model)["total"]
    for d in masks.distributions.values():
        keep = d.keep_mask()
        d.log_alpha.data = torch.where(keep, LOG_ALPHA_MAX, LOG_ALPHA_MIN)
    expected = masks.expected_parameters()
    expected.backward()
    cut(model, masks.final()[0])
    assert count_parameters(model)["total"] < expected.item() < full
    assert all(p.grad is not None and (p.grad > 0).all() for p in masks.mask_parameters())


@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in ARCHITECTURES]
                         + [("llama", {"attention_bias": True, "mlp_bias": True})])
def test_target_parameters_match_a_model_of_that_shape(arch, overrides, tmp_path):
    source = Structure.of(tiny_model(arch, **overrides))
    real = tiny_model(arch, **TARGET_MODEL, **overrides)
    target = parse_target(TARGETS["kv-group"], source)
    assert target_parameters(target, source) == count_parameters(real)["total"]
    real.config.save_pretrained(tmp_path)
    assert parse_target(str(tmp_path), source) == target
    assert parse_target(str(tmp_path / "config.json"), source).describe() == TARGETS["kv-group"]


ERRORS = {
    "depth=3": "unknown target key",
    "layers=three": "not a positive integer",
    "layers=0": "not a positive integer",
    "heads=12": "larger than the source",
    "layers=4": "the source's own shape",
    "heads=4": "not a multiple of kv-heads",
    "heads=2,kv-heads=2": "keep kv-heads=3",
    "layers=3,layers=2": "given twice",
    "layers=3;hidden=64": "not a positive integer",
    "small-model": "neither key=value pairs nor an existing path",
}


@pytest.mark.parametrize("spec", ERRORS)
def test_parse_target_errors_say_what_to_do(spec):
    with pytest.raises(UserError, match=ERRORS[spec]) as error:
        parse_target(spec, Structure.of(tiny_model("llama")))
    assert "\n" not in str(error.value)


def test_parse_target_rejects_what_it_cannot_reach(tmp_path):
    source = Structure.of(tiny_model("llama"))
    uneven = dataclasses.replace(source, layers=(LayerShape(6, 3, 40),) + source.layers[1:])
    for spec, src, message in [
        ("layers=3", uneven, "same shape"),
        (str(tmp_path), source, "holds no config.json"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_target(spec, src)
    tiny_model("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               intermediate_size=32).config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="head_dim"):
        parse_target(str(tmp_path), source)
    q_head = parse_target("heads=3", source)
    assert (q_head.head_unit, q_head.kv_heads) == ("q-head", 3)


@pytest.mark.parametrize("start", [LOG_ALPHA_MAX - 0.5, LOG_ALPHA_MIN + 0.5])
def test_lagrangian_moves_expected_sizes_towards_the_target(start):
    """λ ascends on the constraint violation, log_alpha descends on λ·violation: from above and from
    below, the expected kept counts approach the target steadily (a few steps, before any overshoot)."""
    structure = Structure.of(tiny_model("llama"))
    masks = ShearMasks(structure, parse_target(TARGETS["kv-group"], structure), warmup_steps=0)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.fill_(start)
    descent = torch.optim.AdamW(masks.mask_parameters(), lr=0.2, weight_decay=0.0)
    ascent = torch.optim.AdamW(masks.lagrangian_parameters(), lr=0.2, weight_decay=0.0, maximize=True)
    gaps = []
    for step in range(15):
        loss, info = masks.lagrangian(step)
        gaps.append({kind: info[f"expected_{kind}"] - info[f"target_{kind}"] for kind in masks.distributions})
        descent.zero_grad()
        ascent.zero_grad()
        loss.backward()
        descent.step()
        ascent.step()
    for kind in masks.distributions:
        path = [gap[kind] * (1 if start > 0 else -1) for gap in gaps]  # positive: on the starting side
        assert path[-1] > 0 and path[-1] < 0.95 * path[0], (kind, path)
        assert all(b <= a + 1e-6 for a, b in zip(path, path[1:])), (kind, path)
    assert info["lambda_1_hidden"] * start > 0  # λ1 grew with the sign of the violation


def test_target_warms_up_linearly_and_state_round_trips():
    structure = Structure.of(tiny_model("qwen2"))
    target = parse_target(TARGETS["q-head"], structure)
    masks = ShearMasks(structure, target, warmup_steps=10)
    assert set(masks.distributions) == {"layer", "head", "intermediate", "hidden"}
    assert masks.target_fraction("hidden", 0).item() == 1.0
    assert masks.target_fraction("hidden", 5).item() == pytest.approx(1 - 0.5 * 16 / 96)
    assert masks.target_fraction("hidden", 50).item() == pytest.approx(80 / 96)
    _, info = masks.lagrangian(10)
    assert info["target_head"] == pytest.approx(3) and info["target_layer"] == pytest.approx(3)
    assert info["expected_head"] > 5.9 and "lambda_2_intermediate" in info

    state = masks.state_dict()
    assert {"distributions.head.log_alpha", "lambdas.lambda_1_hidden"} <= set(state)
    again = ShearMasks(structure, target, warmup_steps=10)
    again.load_state_dict(state)
    assert torch.equal(again.distributions["head"].log_alpha, masks.distributions["head"].log_alpha)
