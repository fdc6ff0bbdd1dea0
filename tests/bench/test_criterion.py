"""The criterion benchmark (`prunetune bench-criterion`): one scoring step of vanilla Taylor against
LoRA-guided (and LoRA-guided on an int8 base)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_user_error, run_cli

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
from prunetune.training.lora import lora_matrices
from prunetune.structure.units import PROJECTIONS, base_linear, decoder_layers, projection

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
])
def test_cli_mistakes_are_one_line(args, fragments, tmp_path, no_model_load):
    assert_user_error(run_cli(*args, cwd=tmp_path), *fragments)


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
