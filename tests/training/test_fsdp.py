"""FSDP2 through accelerate on two CPU processes (gloo), with the shipped config
(configs/accelerate/fsdp.yaml): the shared training loop sharded, against one process with the
same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, TESTS, assert_user_error, run_cli

FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
          "--num_processes", "2", "--mixed_precision", "no"]


def _launch(*args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [*LAUNCH, *args] if processes == 2 else [sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _train_run(tmp_path, name: str, batch_size: int, *extra: str, processes: int = 2) -> dict:
    out = tmp_path / f"{name}.json"
    done = _launch(str(TESTS / "fsdp_train_run.py"), str(out), str(batch_size), *extra, processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Full-parameter training: one process at batch 4, FSDP on two processes at batch 2 each."""
    tmp = tmp_path_factory.mktemp("fsdp")
    return _train_run(tmp, "one", 4, processes=1), _train_run(tmp, "two", 2)


def test_fsdp_full_training_follows_the_one_process_loss_curve(full_runs):
    one, two = full_runs
    assert two["processes"] == 2 and two["distributed"] == "DistributedType.FSDP"
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    # The main process gets the trained weights gathered into a plain model.
    assert two["plain"] and set(two["weights"]) == set(one["weights"])
    for name, value in one["weights"].items():
        assert two["weights"][name] == pytest.approx(value, abs=1e-4), name


def test_fsdp_each_process_holds_half_the_parameters_and_optimizer_state(full_runs):
    one, two = full_runs
    processes = two["record"]["processes"]
    assert processes["count"] == 2 and processes["mode"] == "fsdp"
    single = one["held"]["parameters"] + one["held"]["optimizer"]
    for held in processes["state_bytes"]:
        assert held["parameters"] + held["optimizer"] <= 0.55 * single
    assert len(processes["peak_memory_bytes"]) == 2
    assert two["record"]["peak_memory_bytes"] == max(processes["peak_memory_bytes"])


def test_fsdp_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, full_runs):
    _, whole = full_runs
    checkpoint = tmp_path / "run"
    _train_run(tmp_path, "part", 2, "--checkpoint", str(checkpoint), "--stop-after", "4")
    shards = sorted(p.name for p in (checkpoint / "checkpoint" / "shards").iterdir() if p.suffix == ".distcp")
    assert len(shards) == 2  # each process wrote its own shards
    resumed = _train_run(tmp_path, "resumed", 2, "--resume", str(checkpoint))
    assert resumed["record"]["resumed_from_step"] == 3
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    for name, value in whole["weights"].items():
        assert resumed["weights"][name] == pytest.approx(value, abs=1e-6), name


def test_fsdp_lora_training_matches_one_process(tmp_path):
    one = _train_run(tmp_path, "one", 4, "--lora", processes=1)
    two = _train_run(tmp_path, "two", 2, "--lora")
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    for name, value in one["weights"].items():
        assert two["weights"][name] == pytest.approx(value, abs=1e-4), name
    assert two["held"]["parameters"] <= 0.55 * one["held"]["parameters"]  # the frozen base is sharded too


@pytest.mark.slow  # the plain FSDP training above is the first path
def test_fsdp_with_checkpointing_and_accumulation_follows_one_process(tmp_path):
    """Activation checkpointing and two micro-batches per step under FSDP: the same loss curve and weights
    as one process with the same global batch."""
    extra = ("--gradient-checkpointing", "--grad-accum", "2")
    one = _train_run(tmp_path, "one", 2, *extra, processes=1)
    two = _train_run(tmp_path, "two", 1, *extra)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    for name, value in one["weights"].items():
        assert two["weights"][name] == pytest.approx(value, abs=1e-4), name


def test_fsdp_train_command_saves_a_stock_loadable_model(model_dir, tmp_path):
    """`accelerate launch --config_file fsdp.yaml -m prunetune.cli train`: the same directory one process
    writes, gathered on the main process."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "trained"
    done = _launch("-m", "prunetune.cli", "train", str(model_dir), "--data", "a=builtin:pydoc,b=builtin:stdlib-code",
                   "--fixed-mixture", "--steps", "2", "--batch-size", "1", "--seq-len", "32", "--eval-every", "1",
                   "--eval-blocks", "2", "--no-eval", "--max-windows", "2", "--eval-seq-len", "32", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "prunetune.json").read_text())
    assert record["training"]["processes"]["mode"] == "fsdp"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]["total"]


# the distilled case is a second path (make test-slow): the teacher is one more forward per micro-batch
@pytest.mark.parametrize("distill", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "distilled"])
def test_fsdp_loraprune_scores_and_keeps_like_one_process(tmp_path, distill):
    """Each process scores the rows it holds (LoRA's A gathered, partial unit sums added across
    processes): the moving average of the scores, the masks and the adapter match one process with the
    same global batch."""
    from loraprune_run import run

    _, _, structure, masks, pruner, _ = run(batch_size=4, distill=distill)
    out = tmp_path / "two.json"
    done = _launch(str(TESTS / "loraprune_run.py"), str(out), "2", *(["distill"] if distill else []))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["distributed"] == "DistributedType.FSDP"
    for one_layer, two_layer in zip(pruner.average, two["average"]):
        for field, values in ((f, v) for f, v in vars(one_layer).items() if v is not None):
            assert two_layer[field] == pytest.approx(values.tolist(), rel=1e-3, abs=1e-9), field
    assert two["masks"] == masks.kept_summary(structure)


def test_fsdp_one_shot_criteria_score_their_shards_like_one_process(tmp_path):
    """Taylor and Wanda-sp with the model sharded: each process scores the rows it holds and the partial unit
    sums add up to the one-process scores; every process gets the plain model back, weights unchanged."""
    from sharded_scores_run import ARCH, calibration, checksums, scores_dict
    from tiny import tiny_model

    from prunetune.importance import CRITERIA

    out = tmp_path / "scores.json"
    done = _launch(str(TESTS / "sharded_scores_run.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["distributed"] == "DistributedType.FSDP"
    for name in ("taylor", "wanda-sp"):
        model = tiny_model(ARCH, intermediate_size=128)
        one = scores_dict(CRITERIA[name](model, calibration()))
        for one_layer, two_layer in zip(one, two[name]["scores"]):
            for field, values in one_layer.items():
                assert two_layer[field] == pytest.approx(values, rel=1e-4, abs=1e-9), (name, field)
        for weights in two[name]["weights"]:  # on both processes
            assert weights == pytest.approx(checksums(model), rel=1e-6, abs=1e-9)
        assert two[name]["requires_grad"] == sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", [["loraprune", "--steps", "4"],  # the recovery is a second path: make test-slow
                                    pytest.param(["taylor", "--recover-steps", "2"], marks=pytest.mark.slow)],
                         ids=["loraprune", "taylor-recovered"])
def test_fsdp_prune_command_saves_the_cut_model(model_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    done = _launch("-m", "prunetune.cli", "prune", str(model_dir), "--method", *method, "--ratio", "0.5",
                   "--layers", "all", "--batch-size", "1", "--seq-len", "32", "--no-eval", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "prunetune.json").read_text())
    assert record["training"]["processes"]["mode"] == "fsdp"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]["after"]["total"]


SHEAR = ["--target", "layers=3,hidden=64,heads=4,kv-heads=2,intermediate=32", "--data",
         "code=builtin:stdlib-code,prose=builtin:pydoc", "--dynamic-loading", "--steps", "6", "--seq-len", "32",
         "--eval-every", "2", "--eval-blocks", "2", "--max-windows", "2", "--eval-seq-len", "32", "--no-eval"]


@pytest.mark.slow  # a second method through the FSDP CLI path the prune and train tests cover: make test-slow
def test_fsdp_shear_ends_with_the_masks_and_shape_of_one_process(model_dir, tmp_path):
    """All weights, the mask logits and the Lagrange multipliers trained under FSDP: the masks stay the same
    in every process, and the cut model the main process saves has the kept units and the exact shape of
    a one-process run with the same global batch."""
    from transformers import AutoModelForCausalLM

    from prunetune.structure.units import Structure

    records = {}
    for name, processes, batch in (("one", 1, "2"), ("two", 2, "1")):
        out = tmp_path / name
        done = _launch("-m", "prunetune.cli", "shear", str(model_dir), *SHEAR, "--batch-size", batch, "--out", str(out),
                       processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
        records[name] = json.loads((out / "prunetune.json").read_text())
    one, two = records["one"], records["two"]
    assert two["training"]["processes"]["mode"] == "fsdp"
    assert two["kept"] == one["kept"]
    assert two["parameters"]["after"] == one["parameters"]["after"]
    assert [h["loss"] for h in two["training"]["history"]] == pytest.approx(
        [h["loss"] for h in one["training"]["history"]], abs=1e-4)
    assert two["checks"]["masked_vs_cut_max_abs_logit_diff"] < 1e-4
    structure = Structure.of(AutoModelForCausalLM.from_pretrained(tmp_path / "two"))
    assert (structure.num_layers, structure.hidden) == (3, 64)
    assert {(s.num_heads, s.num_kv_heads, s.intermediate) for s in structure.layers} == {(4, 2, 32)}


@pytest.mark.slow  # a second method through the FSDP CLI path the prune and train tests cover: make test-slow
def test_fsdp_loram_align_keeps_the_zeros_and_train_saves_the_adapter(model_dir, tmp_path):
    """LoRAM's two training steps under FSDP: full-parameter alignment of an unstructured prune keeps every
    pruned weight at zero (each process masks its own rows), and the adapter trained on it loads in PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunetune.methods.loram.sparsity import sparsity_summary

    pruned, aligned, adapter = tmp_path / "pruned", tmp_path / "aligned", tmp_path / "adapter"
    done = run_cli("loram", "prune", str(model_dir), "--method", "unst", "--ratio", "0.5", "--out", str(pruned),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    small = ["--steps", "3", "--batch-size", "1", "--seq-len", "32"]
    done = _launch("-m", "prunetune.cli", "loram", "align", str(pruned), *small, "--out", str(aligned))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((aligned / "prunetune.json").read_text())
    assert record["training"]["processes"]["mode"] == "fsdp"
    model = AutoModelForCausalLM.from_pretrained(aligned)
    before = sparsity_summary(AutoModelForCausalLM.from_pretrained(pruned))["parameters"]
    assert sparsity_summary(model)["parameters"]["nonzero"] == before["nonzero"]
    done = _launch("-m", "prunetune.cli", "loram", "train", str(aligned), *small, "--out", str(adapter))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((adapter / "prunetune.json").read_text())["training"]["processes"]["mode"] == "fsdp"
    PeftModel.from_pretrained(model, adapter)


@pytest.mark.parametrize("command", [["prune", "{model}", "--method", "taylor", "--recover-steps", "2", "--no-eval"],
                                     ["loram", "train", "{model}"]], ids=["prune", "loram-train"])
def test_quantized_bases_refuse_fsdp_before_loading(model_dir, tmp_path, command, monkeypatch, no_model_load):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    done = run_cli(*[str(model_dir) if a == "{model}" else a for a in command], "--quant", "8bit", "--seq-len", "64",
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(done, "FSDP")
    assert not (tmp_path / "out").exists()
