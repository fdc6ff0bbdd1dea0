"""The criterion benchmark (`prunetune bench-criterion`) and mask agreement (`prunetune masks-agree`)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_errors import assert_user_error, no_model_load, run_cli  # noqa: F401 (a fixture)
from tiny import save_tiny_model_dir, tiny_model, tokens

from prunetune.errors import UserError
from prunetune.bench.criterion import (
    VARIANTS,
    BenchSettings,
    bench_criterion,
    build_model,
    lora_guided_step,
    result_table,
    taylor_step,
)
from prunetune.importance import taylor_scores
from prunetune.training.lora import LoraSettings, add_lora, lora_matrices
from prunetune.methods.loraprune.masks_agree import (
    AgreeSettings, accumulate_scores, compare_masks, compare_scores, masks_agree, overlap, parse_ratios,
    random_overlap, randomize_lora_b,
)
from prunetune.structure.allocate import select_masks
from prunetune.structure.units import PROJECTIONS, Structure, base_linear, decoder_layers, projection

TINY = dict(shape="tiny", seq_len=32, warmup=0, repeats=2)


@pytest.fixture
def one_thread():
    """Tiny steps are hundreds of small ops; two threads on two busy cores make each one wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Criterion benchmark


def test_bench_runs_three_variants_on_the_tiny_shape(one_thread):
    result = bench_criterion(BenchSettings(**TINY), isolate=False)
    assert [v.variant for v in result.variants] == list(VARIANTS)
    for v in result.variants:
        if v.skipped:  # only the int8 variant may be skipped, and then it says why
            assert v.variant == "lora-guided-8bit" and v.skipped.strip()
            continue
        assert v.step_seconds > 0 and len(v.step_times) == 2
        assert v.peak_memory_bytes > 0 and v.weights_bytes > 0
        assert v.memory_measure and torch.isfinite(torch.tensor(v.loss))
    record = json.loads(json.dumps(result.to_dict()))
    assert record["device"] == "cpu" and record["dtype"] == "float32"
    assert record["variants"][0]["memory_ratio"] == 1.0
    assert result_table(result).row_count == 3
    eight_bit = result.get("lora-guided-8bit")
    if not eight_bit.skipped:  # int8 weights take a quarter of the fp32 ones (embeddings stay fp32)
        assert eight_bit.weights_bytes < result.get("lora-guided").weights_bytes


def _grad_counter(params):
    counts = {id(p): 0 for p in params}
    handles = [p.register_post_accumulate_grad_hook(lambda p: counts.__setitem__(id(p), counts[id(p)] + 1))
               for p in params]
    return counts, handles


def test_taylor_step_takes_weight_gradients_and_lora_guided_does_not(one_thread):
    settings = BenchSettings(**TINY)
    batch = torch.randint(0, 1000, (1, 32))
    cpu = torch.device("cpu")

    model = build_model(settings, "taylor", cpu, torch.float32)
    weights = [base_linear(projection(layer, n)).weight for layer in decoder_layers(model) for n in PROJECTIONS]
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(w) for w in weights}
    counts, handles = _grad_counter(weights)
    taylor_step(model, batch)
    assert all(c == 1 for c in counts.values())  # every projection weight got its gradient
    assert all(p.grad is None for p in model.parameters())  # and the step dropped them
    for h in handles:
        h.remove()

    model = build_model(settings, "lora-guided", cpu, torch.float32)
    loras = [p for layer in decoder_layers(model) for m in lora_matrices(layer) for p in (m.A, m.B)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in loras}
    counts, handles = _grad_counter(loras)
    lora_guided_step(model, batch)
    assert all(c == 1 for c in counts.values())
    assert all(p.grad is None for p in model.parameters())  # no base weight ever held a gradient
    for h in handles:
        h.remove()


@pytest.mark.parametrize("bad, fragment", [
    (dict(shape="gpt-5"), "unknown shape 'gpt-5'; available: llama-7b"),
    (dict(variants=("taylor", "nope")), "unknown variant 'nope'"),
    (dict(repeats=0), "BenchSettings.repeats"),
    (dict(seq_len=1), "BenchSettings.seq_len"),
])
def test_bench_bad_settings(bad, fragment):
    with pytest.raises(UserError, match=fragment):
        bench_criterion(BenchSettings(**(TINY | bad)))


def test_cli_bench_in_a_fresh_process(tmp_path):
    out = tmp_path / "bench.json"
    done = run_cli("bench-criterion", "--shape", "tiny", "--seq-len", "16", "--warmup-runs", "0", "--repeats", "1",
                   "--variants", "lora-guided", "--json", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lora-guided" in done.stdout and "peak memory" in done.stdout
    record = json.loads(out.read_text())
    assert record["command"] == "bench-criterion" and record["settings"]["shape"] == "tiny"
    assert "fresh process" in record["memory_measure"]
    (variant,) = record["variants"]
    assert variant["step_seconds"] > 0 and variant["peak_memory_bytes"] > 0


@pytest.mark.parametrize("args, fragments", [
    (("bench", "criterion"), ("moved to `prunetune bench-criterion`",)),
    (("bench-criterion", "--shape", "llama-70b"), ("unknown shape 'llama-70b'", "smollm2-135m")),
    (("masks-agree", "smollm2-135m", "--ratios", "0.1,1.5"), ("--ratios", "1.5")),
    (("masks-agree", "smollm2-135m", "--ratios", "0,0.5"), ("--ratios",)),
])
def test_cli_mistakes_are_one_line(args, fragments, tmp_path, no_model_load):
    assert_user_error(run_cli(*args, cwd=tmp_path), *fragments)


# ---------------------------------------------------------------------------------------------
# Mask agreement


def test_overlap_and_random_baseline():
    a = torch.tensor([True, True, False, False])
    assert overlap(a, a) == 1.0 and overlap(~a, ~a) == 1.0
    assert overlap(a, ~a) == 0.0
    assert overlap(a, torch.tensor([True, False, True, False])) == 0.5
    assert overlap(torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)) is None
    assert random_overlap([2], [4]) == 0.5  # kept fraction
    assert random_overlap([3, 1], [4, 4]) == pytest.approx((9 / 4 + 1 / 4) / 4)


def test_identical_scores_agree_completely():
    model = tiny_model("llama")
    structure = Structure.of(model)
    scores = taylor_scores(model, [tokens()])
    layers = list(range(structure.num_layers))
    for entry in compare_scores(structure, scores, scores, (0.1, 0.3, 0.5), layers, round_to=1):
        for kind in ("heads", "channels"):
            assert entry[kind]["overlap_kept"] == 1.0
            assert entry[kind]["overlap_pruned"] in (1.0, None)
    masks = select_masks(structure, scores, 0.5, layers, round_to=1)
    assert compare_masks(structure, masks, masks, layers, "channels")["overlap_pruned"] == 1.0


def test_one_pass_gives_taylor_and_lora_guided_scores():
    model = add_lora(tiny_model("llama"), LoraSettings(dropout=0.0))
    randomize_lora_b(model, seed=0)
    assert all(m.B.abs().sum() > 0 for layer in decoder_layers(model) for m in lora_matrices(layer))
    batches = [tokens(seed=1), tokens(seed=2)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    taylor, lora = accumulate_scores(model, batches)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # put back as found
    assert all(p.grad is None for p in model.parameters())
    # Taylor from the shared pass is taylor_scores of the mean loss (taylor_scores sums the batches).
    for got, want in zip(taylor, taylor_scores(model, batches)):
        torch.testing.assert_close(got.channels * len(batches), want.channels, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(got.q_heads * len(batches), want.q_heads, rtol=1e-4, atol=1e-8)
    for s in lora:
        assert (s.channels > 0).all() and torch.isfinite(s.q_heads).all()

    structure = Structure.of(model)
    results = compare_scores(structure, taylor, lora, (0.1, 0.2, 0.3, 0.5), list(range(structure.num_layers)))
    assert [r["ratio"] for r in results] == [0.1, 0.2, 0.3, 0.5]
    for entry in results:
        for kind in ("heads", "channels"):
            c = entry[kind]
            for key in ("overlap_kept", "overlap_pruned", "random_kept", "random_pruned"):
                assert c[key] is None or 0.0 <= c[key] <= 1.0, (key, c)
            assert 0 < c["kept"] <= c["units"]


def test_parse_ratios():
    assert parse_ratios("0.1, 0.2,0.5") == (0.1, 0.2, 0.5)
    for bad in ("0", "1", "0.2,-0.1", "x", ""):
        with pytest.raises(UserError, match="AgreeSettings.ratios"):
            parse_ratios(bad)
    with pytest.raises(UserError, match="AgreeSettings.ratios"):
        AgreeSettings(ratios=(1.2,)).check()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


def test_masks_agree_on_a_tiny_model_with_lora_training(model_dir):
    settings = AgreeSettings(ratios=(0.2, 0.5), batches=2, seq_len=32, steps=2, layers="1-3")
    record = masks_agree(str(model_dir), settings, progress=False)
    assert record["command"] == "masks-agree" and record["layers"] == [1, 2, 3]
    assert record["lora"].startswith("trained 2 steps")
    assert [r["ratio"] for r in record["results"]] == [0.2, 0.5]
    for entry in record["results"]:
        for kind in ("heads", "channels"):
            assert entry[kind]["overlap_kept"] is None or 0.0 <= entry[kind]["overlap_kept"] <= 1.0
    json.dumps(record)


def test_an_int8_failure_is_reported_not_raised(monkeypatch, one_thread):
    import prunetune.bench.criterion as bench

    def boom(model, batch, autocast):
        raise NotImplementedError("no int8 backward here")

    monkeypatch.setitem(bench.STEPS, "lora-guided-8bit", boom)
    result = bench_criterion(BenchSettings(**TINY, variants=("lora-guided-8bit",)), isolate=False)
    (variant,) = result.variants
    assert "no int8 backward here" in variant.skipped and variant.step_seconds is None
    assert result.ratios("lora-guided-8bit") == {"memory_ratio": None, "speedup": None}
    result_table(result)  # renders a skipped row

    monkeypatch.setitem(bench.STEPS, "taylor", boom)  # any other variant's failure is a bug: raised
    with pytest.raises(NotImplementedError):
        bench_criterion(BenchSettings(**TINY, variants=("taylor",)), isolate=False)
