"""The speed benchmark (`prunetune bench`): FLOPs, the decode loop, the table and JSON, LoRA rows, mistakes."""

from __future__ import annotations

import json
import re
import statistics

import pytest
import torch
from helpers import assert_user_error, run_cli
from tiny import tiny_config, tiny_model

from prunetune import load_model
from prunetune.errors import UserError
from prunetune.bench.flops import prefill_flops
from prunetune.bench.shapes import save_random_model
from prunetune.bench.speed import Job, SpeedSettings, bench_speed, plan, timed_generation
from prunetune.bench.speed_table import result_table
from prunetune.training.lora import LoraSettings, add_lora, lora_matrices
from prunetune.runs.settings import EvalSettings, RunOptions
from prunetune.methods.prune import PruneSettings, prune
from prunetune.structure.units import Structure, decoder_layers


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """dense: a tiny Llama (128 positions) with a placeholder tokenizer; pruned: half of layers 1-3
    removed (layers of different shapes); adapter: a LoRA on the pruned model with a non-zero B."""
    work = tmp_path_factory.mktemp("speed")
    save_random_model(tiny_config("llama"), work / "dense", dtype=torch.float32)
    prune(str(work / "dense"), work / "pruned", PruneSettings(method="magnitude", ratio=0.5, layers="1-3", round_to=8),
          EvalSettings(data=None), RunOptions(progress=False), log=lambda _: None)
    model, _ = load_model(str(work / "pruned"))
    model = add_lora(model, LoraSettings(dropout=0.0))
    for layer in decoder_layers(model):
        for m in lora_matrices(layer):
            torch.nn.init.normal_(m.B, std=0.02)
    model.save_pretrained(work / "adapter")
    return work


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_prefill_flops_by_hand():
    # tiny Llama: hidden 96, 6 query heads and 3 kv heads of 16, MLP 48, vocab 96, 4 layers; 8 tokens
    s = Structure.of(tiny_model("llama"))
    q, kv, o = 2 * 8 * 96 * 96, 2 * 8 * 96 * 48, 2 * 8 * 96 * 96  # q 96 wide, k and v 48 wide each
    attention = 2 * (6 * 36 * 16 * 2)  # Q·Kᵀ and scores·V: 6 heads, 8·9/2 = 36 causal pairs, head dim 16
    mlp = 3 * 2 * 8 * 96 * 48
    lm_head = 2 * 96 * 96  # the last position only
    per_sequence = 4 * (q + 2 * kv + o + attention + mlp) + lm_head
    assert prefill_flops(s, 8) == per_sequence == 2_727_936
    assert prefill_flops(s, 8, batch=3) == 3 * per_sequence
    assert prefill_flops(s, 8, lora=[(2, 96, 48)]) == per_sequence + 2 * 8 * 2 * (96 + 48)


def test_prefill_flops_match_torch_flop_counter_on_per_layer_shapes(work):
    """torch's FlopCounterMode counts eager attention over all T² pairs; ours counts the causal half."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = load_model(str(work / "pruned"))
    s = Structure.of(model)
    assert len(set(s.layers)) > 1  # layers of different shapes
    model.config._attn_implementation = "eager"
    t = 10
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(0, 96, (2, t)), use_cache=True, logits_to_keep=1)
    upper = sum(2 * 2 * s.head_dim * shape.num_heads * (t * t - t * (t + 1) // 2) for shape in s.layers)
    assert counter.get_total_flops() == prefill_flops(s, t, batch=2) + 2 * upper


# ---------------------------------------------------------------------------------------------
# The decode loop


def test_decode_loop_is_greedy_generation_over_the_kv_cache():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None  # the loop never stops early, nor suppresses a token
    prompt = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        prefill_s, decode_s, tokens = timed_generation(model, prompt, 5, torch.device("cpu"))
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)
    assert prefill_s > 0 and decode_s > 0
    assert torch.equal(tokens, want[:, 12:])


def test_shape_models_in_process_and_prefill_only():
    settings = SpeedSettings(models=("shape:tiny",), prompt_len=8, decode_tokens=0, warmup=0, repeats=1, device="cpu")
    result = bench_speed(settings, isolate=False)
    (row,) = result.rows
    assert row.decode_tokens_per_second is None and row.prefill_seconds > 0
    assert row.peak_memory_bytes > 0 and row.weights_bytes > 0
    assert result.ratios(row)["prefill_ratio"] == 1.0
    assert result_table(result).row_count == 1


# ---------------------------------------------------------------------------------------------
# The command, in a fresh process: table, JSON, LoRA rows


def test_cli_bench_pruned_against_dense_with_lora(work):
    done = run_cli("bench", "dense", "pruned", "--prompt-len", "16", "--decode-tokens", "4", "--warmup-runs", "1",
                   "--repeats", "2", "--adapter", "adapter", "--json", "speed.json", cwd=work)
    assert done.returncode == 0, done.stderr
    for text in ("prefill ms", "tok/s", "FLOPs", "peak memory", "pruned + LoRA (unmerged)", "pruned + LoRA (merged)",
                 "fresh process", "LoRA not measured on dense"):
        assert text in done.stdout, text
    record = json.loads((work / "speed.json").read_text())
    assert record["command"] == "bench" and record["benchmark"] == "speed" and record["reference"] == "dense"
    dense, pruned, unmerged, merged = record["rows"]
    assert [(r["model"], r["variant"]) for r in record["rows"]] == [
        ("dense", "model"), ("pruned", "model"), ("pruned", "lora-unmerged"), ("pruned", "lora-merged")]
    for key in ("prefill_ratio", "flops_ratio", "decode_ratio", "memory_ratio", "parameters_ratio"):
        assert dense[key] == 1.0
    for row in record["rows"]:
        assert len(row["prefill_times"]) == len(row["decode_times"]) == 2
        assert row["prefill_seconds"] == statistics.median(row["prefill_times"])
        assert row["decode_tokens_per_second"] == pytest.approx(4 / statistics.median(row["decode_times"]))
        assert row["peak_memory_bytes"] > 0 and row["weights_bytes"] > 0
        assert row["prefill_ratio"] == pytest.approx(row["prefill_seconds"] / dense["prefill_seconds"])
    assert 0 < pruned["flops_ratio"] < 1 and pruned["parameters_ratio"] < 1
    assert pruned["prefill_flops"] == merged["prefill_flops"] < unmerged["prefill_flops"]  # LoRA's A and B products
    assert unmerged["lora_parameters"] > 0 and merged["lora_parameters"] == pruned["lora_parameters"] == 0
    assert pruned["parameters"] == unmerged["parameters"] == merged["parameters"]
    assert record["lora_misfits"] and record["lora_misfits"][0].startswith("dense:")


# ---------------------------------------------------------------------------------------------
# Mistakes: one line, before any model is loaded


@pytest.mark.parametrize("change, fragment", [
    (dict(models=("./no-such-dir",)), "no such model"),
    (dict(models=("shape:gpt-5",)), "unknown shape 'gpt-5'"),
    (dict(prompt_len=120, decode_tokens=16), "has 128 positions, fewer than SpeedSettings.prompt_len 120 + "
                                             "SpeedSettings.decode_tokens 16; use SpeedSettings.prompt_len 112 "
                                             "or less"),
    (dict(decode_tokens=200), "keep SpeedSettings.prompt_len + SpeedSettings.decode_tokens at 128 or less"),
    (dict(repeats=0), "SpeedSettings.repeats must be at least 1"),
    (dict(models=()), "at least one model"),
    (dict(lora="dense"), "not a PEFT adapter directory"),
])
def test_plan_refuses_mistakes(work, monkeypatch, change, fragment):
    monkeypatch.chdir(work)
    settings = SpeedSettings(**(dict(models=("dense",), prompt_len=16, decode_tokens=8) | change))
    with pytest.raises(UserError, match=re.escape(fragment)):
        plan(settings)


def test_plan_adds_lora_rows_only_where_the_adapter_fits(work, monkeypatch):
    monkeypatch.chdir(work)
    jobs, misfits = plan(SpeedSettings(models=("dense", "pruned"), prompt_len=16, decode_tokens=8, lora="adapter"))
    assert jobs == [Job("dense"), Job("pruned"), Job("pruned", "lora-unmerged"), Job("pruned", "lora-merged")]
    assert "the adapter expects" in misfits[0]
    with pytest.raises(UserError, match="fits none of the models"):
        plan(SpeedSettings(models=("dense",), prompt_len=16, decode_tokens=8, lora="adapter"))


@pytest.mark.parametrize("args, fragments", [
    (("bench", "dense", "--prompt-len", "200"), ("has 128 positions",)),
    (("bench", "dense", "--prompt-len", "16", "--decode-tokens", "8", "--adapter", "adapter"),
     ("fits none of the models", "dense:")),
])
def test_cli_mistakes_are_one_line(work, args, fragments):
    assert_user_error(run_cli(*args, cwd=work), *fragments)
