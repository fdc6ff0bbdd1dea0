"""methods/sheared/dynamic_loading.py: the update rule, scaling-law references, per-domain losses, the hook."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_model

from prunetune.methods.sheared.domains import DomainSampler, parse_domains
from prunetune.errors import UserError
from prunetune.methods.sheared.dynamic_loading import (
    DynamicLoading, domain_losses, fit_scaling_law, predict_loss, resolve_references, update_weights, worst_gap,
)
from prunetune.training.loop import TrainSettings, train

# ---------------------------------------------------------------------------------------------
# The update rule


def test_a_lagging_domain_gains_weight():
    w = update_weights(torch.tensor([0.5, 0.5]), [3.0, 2.0], [2.0, 2.0])
    assert w[0] > 0.7 and math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
    expected = torch.softmax(torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
                             + torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    assert torch.allclose(w, (1 - 1e-4) * expected + 1e-4 / 2)


def test_clamp_keeps_a_domain_below_its_reference_in_proportion():
    w0 = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    losses, refs = [3.0, 1.0, 2.0], [2.0, 2.0, 2.0]  # domain 1 is below its reference, domain 2 at it
    clamped = update_weights(w0, losses, refs, smoothing=0.0)
    assert math.isclose(float(clamped[1] / clamped[2]), 0.3 / 0.5, rel_tol=1e-9)
    unclamped = update_weights(w0, losses, refs, smoothing=0.0, clamp=False)  # the official code
    assert math.isclose(float(unclamped[1] / unclamped[2]), 0.3 / 0.5 * math.exp(-1.0), rel_tol=1e-9)
    assert unclamped[1] < clamped[1]


def test_no_gap_changes_nothing_but_the_smoothing():
    w0 = torch.tensor([0.1, 0.9], dtype=torch.float64)
    w = update_weights(w0, [1.0, 1.0], [2.0, 2.0])
    assert torch.allclose(w, (1 - 1e-4) * w0 + 0.5e-4)


def test_smoothing_keeps_every_domain_alive():
    w = update_weights(torch.tensor([1.0, 0.0, 0.0]), [9.0, 9.0, 9.0], [0.0, 0.0, 0.0], smoothing=1e-3)
    assert (w >= 1e-3 / 3 - 1e-15).all() and math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)


def test_worst_gap():
    assert worst_gap({"a": 2.0, "b": 3.5}, {"a": 2.5, "b": 3.0}) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Reference losses


def test_fit_scaling_law_recovers_a_known_law():
    a, b, c = 406.4, 0.34, 1.69
    sizes = [1.3e8, 4.1e8, 1.4e9, 2.8e9]
    law = fit_scaling_law(sizes, [a / n ** b + c for n in sizes])
    assert law == pytest.approx((a, b, c), rel=1e-4)
    assert predict_loss(law, 7e9) == pytest.approx(a / 7e9 ** b + c, rel=1e-6)


def test_fit_scaling_law_from_three_exact_points():
    sizes = [1e9, 3e9, 1e10]
    law = fit_scaling_law(sizes, [50.0 / n ** 0.2 + 1.2 for n in sizes])
    assert law == pytest.approx((50.0, 0.2, 1.2), rel=1e-4)


@pytest.mark.parametrize("sizes, losses, expected", [
    ([1e9, 2e9], [2.0, 1.9], "3 or more"),
    ([1e9, 1e9, 2e9], [2.0, 2.0, 1.9], "3 or more"),
    ([1e9, 2e9, 4e9], [1.8, 1.9, 2.0], "do not fall"),
])
def test_fit_scaling_law_mistakes(sizes, losses, expected):
    with pytest.raises(UserError, match=expected):
        fit_scaling_law(sizes, losses)


def law_domains(tmp_path):
    sizes = (1e8, 1e9, 1e10)
    points = "".join(f"  - {{parameters: {n}, losses: {{code: {100 / n ** 0.3 + 1.0}, "
                     f"prose: {80 / n ** 0.25 + 2.0}}}}}\n"
                     for n in sizes)
    path = tmp_path / "d.yaml"
    path.write_text("domains:\n  code: {data: builtin:stdlib-code, reference: 0.5}\n  prose: builtin:pydoc\n"
                    "scaling_law:\n" + points)
    return str(path)


def test_references_come_given_then_scaling_law_then_source(tmp_path):
    calls = []

    def source():
        calls.append(1)
        return {"code": 1.1, "prose": 2.2}

    domains = parse_domains(law_domains(tmp_path))
    refs, where = resolve_references(domains, 3_000_000_000, source)
    assert refs["code"] == 0.5 and refs["prose"] == pytest.approx(80 / 3e9 ** 0.25 + 2.0, rel=1e-5)
    assert not calls and "given (code)" in where and "scaling law fit" in where

    refs, where = resolve_references(domains, None, source)  # no target size: the source's own loss
    assert refs == {"code": 0.5, "prose": 2.2} and calls == [1] and "source model's loss (prose)" in where

    plain = parse_domains("code=builtin:stdlib-code,prose=builtin:pydoc")
    assert resolve_references(plain, 10**9, source) == ({"code": 1.1, "prose": 2.2}, "source model's loss")
    assert (resolve_references(parse_domains("code=builtin:pydoc", references="code=2"), None, None)
            == ({"code": 2.0}, "given"))


def test_no_way_to_a_reference_is_a_user_error():
    with pytest.raises(UserError, match="no reference loss for domain 'code'"):
        resolve_references(parse_domains("code=builtin:pydoc"), None, None)


# ---------------------------------------------------------------------------------------------
# Per-domain losses

VOCAB, SEQ = 96, 16


def domain_blocks(seed: int, rows: int, pattern: bool) -> torch.Tensor:
    """Random tokens, or a short repeated pattern (a domain the model learns quickly)."""
    g = torch.Generator().manual_seed(seed)
    if pattern:
        return (torch.arange(SEQ) % 4 + 10).repeat(rows, 1)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=g)


def test_domain_losses_are_token_weighted_and_restore_the_mode():
    model = tiny_model("llama").train()
    blocks = domain_blocks(1, 5, pattern=False)
    mask = torch.ones_like(blocks, dtype=torch.bool)
    mask[0, 5:] = False  # an uneven number of targets per batch
    losses = domain_losses(model, {"a": (blocks, mask)}, batch_size=2)
    assert model.training
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=blocks).logits[:, :-1]
        targets = blocks[:, 1:].masked_fill(~mask[:, 1:], -100)
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    assert losses["a"] == pytest.approx(float(expected), rel=1e-5)


def test_domain_losses_on_a_peft_model():
    """The adapted model's loss (a random B, so the adapter counts), in eval mode (no LoRA dropout)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5,
                                                           init_lora_weights=False))
    model.train()
    blocks = domain_blocks(2, 3, pattern=False)
    losses = domain_losses(model, {"a": (blocks, torch.ones_like(blocks, dtype=torch.bool))}, batch_size=2)
    assert model.training
    with torch.no_grad():
        model.eval()
        adapted = model(input_ids=blocks).logits[:, :-1].reshape(-1, VOCAB)
        with model.disable_adapter():
            base = model(input_ids=blocks).logits[:, :-1].reshape(-1, VOCAB)
    targets = blocks[:, 1:].reshape(-1)
    assert losses["a"] == pytest.approx(float(torch.nn.functional.cross_entropy(adapted, targets)), rel=1e-5)
    assert losses["a"] != pytest.approx(float(torch.nn.functional.cross_entropy(base, targets)), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The hook in the training loop

NAMES = ("noise", "pattern")
REFERENCES = {"noise": 0.0, "pattern": 100.0}  # noise lags far behind; pattern is already below


def run(dynamic: bool = True, eval_every: int = 2, steps: int = 6, checkpoint_every: int = 0, **train_kwargs):
    model = tiny_model("llama")
    blocks = torch.cat([domain_blocks(1, 8, pattern=False), domain_blocks(0, 8, pattern=True)])
    mask = torch.ones_like(blocks, dtype=torch.bool)
    held = {"noise": (domain_blocks(2, 3, pattern=False), torch.ones(3, SEQ, dtype=torch.bool)),
            "pattern": (domain_blocks(0, 3, pattern=True), torch.ones(3, SEQ, dtype=torch.bool))}
    s = TrainSettings(steps=steps, batch_size=2, seq_len=SEQ, lr=1e-3, warmup=0.0, seed=0,
                      checkpoint_every=checkpoint_every)
    sampler = DomainSampler(((0, 8), (8, 16)), s, 1, 0, torch.tensor([0.5, 0.5]))
    hooks = DynamicLoading(model, sampler, NAMES, held, REFERENCES, eval_every=eval_every, batch_size=4,
                           dynamic=dynamic)
    result = train(model, blocks, mask, s, hooks=hooks, sampler=sampler, progress=False, **train_kwargs)
    return model, sampler, result


@pytest.fixture(scope="module")
def uninterrupted():
    return run()


def test_history_carries_weights_every_step_and_losses_when_evaluated(uninterrupted):
    _, sampler, result = uninterrupted
    history = result.history
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert all(set(h["domain_weights"]) == set(NAMES) for h in history)
    assert [("domain_losses" in h) for h in history] == [False, True, False, True, False, True]
    assert history[1]["reference_losses"] == REFERENCES
    assert history[0]["domain_weights"] == history[1]["domain_weights"] == {"noise": 0.5, "pattern": 0.5}


def _paper_update(weights: dict, losses: dict, references: dict) -> dict:
    """Algorithm 1 of the paper by hand: Δ = max(L − L_ref, 0), w ← softmax(log w + η·Δ) with η = 1,
    then w ← (1 − c)·w + c/k with c = 1e-4."""
    raised = {n: weights[n] * math.exp(max(losses[n] - references[n], 0.0)) for n in weights}
    total = sum(raised.values())
    return {n: (1 - 1e-4) * w / total + 1e-4 / len(weights) for n, w in raised.items()}


def test_weights_move_toward_the_domain_that_lags_most(uninterrupted):
    """After each evaluation the next steps draw from exactly the updated weights: noise, far above its
    reference, gains; pattern, below its reference, only loses what the normalisation takes."""
    _, sampler, result = uninterrupted
    history = result.history
    weights = history[0]["domain_weights"]
    for step, entry in enumerate(history, start=1):
        assert entry["domain_weights"] == pytest.approx(weights, rel=1e-12, abs=0), step
        if "domain_losses" in entry:
            assert entry["domain_losses"]["noise"] > REFERENCES["noise"]  # lags: its gap counts
            assert entry["domain_losses"]["pattern"] < REFERENCES["pattern"]  # ahead: its gap is clamped to 0
            updated = _paper_update(weights, entry["domain_losses"], REFERENCES)
            assert updated["noise"] > weights["noise"]
            weights = updated
    assert sampler.weights.tolist() == pytest.approx([weights["noise"], weights["pattern"]], rel=1e-12, abs=0)
    assert weights["noise"] > 0.99


def test_resumed_run_ends_like_the_uninterrupted_one(uninterrupted, tmp_path):
    model, sampler, result = uninterrupted
    run(checkpoint_dir=tmp_path, checkpoint_every=1, stop_after=3)  # killed after step 3
    resumed_model, resumed_sampler, resumed = run(checkpoint_dir=tmp_path, resume=True)
    assert resumed.resumed_from_step == 3
    assert torch.equal(resumed_sampler.weights, sampler.weights)
    assert resumed_sampler.state_dict()["cursors"] == sampler.state_dict()["cursors"]
    assert [h["domain_weights"] for h in resumed.history] == [h["domain_weights"] for h in result.history]
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_fixed_mixture_evaluates_but_keeps_the_weights():
    _, sampler, result = run(dynamic=False, eval_every=2, steps=4)
    assert torch.allclose(sampler.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert all(h["domain_weights"] == {"noise": 0.5, "pattern": 0.5} for h in result.history)
    evaluated = [h for h in result.history if "domain_losses" in h]
    assert [h["step"] for h in evaluated] == [2, 4]
    assert evaluated[0]["domain_losses"]["noise"] > evaluated[0]["domain_losses"]["pattern"]
