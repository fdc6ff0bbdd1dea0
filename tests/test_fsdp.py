"""FSDP2 through accelerate on two CPU processes (gloo), with the shipped config
(configs/accelerate/fsdp.yaml): the shared training loop sharded, against one process with the
same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import assert_user_error, no_model_load, run_cli  # noqa: F401 (a fixture)
from tiny import save_tiny_model_dir

HERE = Path(__file__).parent
FSDP_CONFIG = HERE.parent / "configs" / "accelerate" / "fsdp.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
          "--num_processes", "2", "--mixed_precision", "no"]


def _launch(*args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [*LAUNCH, *args] if processes == 2 else [sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _train_run(tmp_path, name: str, batch_size: int, *extra: str, processes: int = 2) -> dict:
    out = tmp_path / f"{name}.json"
    done = _launch(str(HERE / "fsdp_train_run.py"), str(out), str(batch_size), *extra, processes=processes)
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


def test_fsdp_train_command_saves_a_stock_loadable_model(tmp_path):
    """`accelerate launch --config_file fsdp.yaml -m prunetune.cli train`: the same directory one process
    writes, gathered on the main process."""
    from transformers import AutoModelForCausalLM

    source = save_tiny_model_dir(tmp_path / "tiny", "llama")
    out = tmp_path / "trained"
    done = _launch("-m", "prunetune.cli", "train", str(source), "--data", "a=builtin:pydoc,b=builtin:stdlib-code",
                   "--fixed-mixture", "--steps", "2", "--batch-size", "1", "--seq-len", "32", "--eval-every", "1",
                   "--eval-blocks", "2", "--no-eval", "--max-windows", "2", "--eval-seq-len", "32", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "prunetune.json").read_text())
    assert record["training"]["processes"]["mode"] == "fsdp"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]["total"]


@pytest.mark.parametrize("distill", [False, True], ids=["plain", "distilled"])
def test_fsdp_loraprune_scores_and_keeps_like_one_process(tmp_path, distill):
    """Each process scores the rows it holds (LoRA's A gathered, partial unit sums added across
    processes): the moving average of the scores, the masks and the adapter match one process with the
    same global batch."""
    from loraprune_run import run

    _, _, structure, masks, pruner, _ = run(batch_size=4, distill=distill)
    out = tmp_path / "two.json"
    done = _launch(str(HERE / "loraprune_run.py"), str(out), "2", *(["distill"] if distill else []))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["distributed"] == "DistributedType.FSDP"
    for one_layer, two_layer in zip(pruner.average, two["average"]):
        for field, values in vars(one_layer).items():
            assert two_layer[field] == pytest.approx(values.tolist(), rel=1e-3, abs=1e-9), field
    assert two["masks"] == masks.kept_summary(structure)


def test_fsdp_prune_command_saves_the_cut_model(tmp_path):
    from transformers import AutoModelForCausalLM

    source = save_tiny_model_dir(tmp_path / "tiny", "llama")
    out = tmp_path / "pruned"
    done = _launch("-m", "prunetune.cli", "prune", str(source), "--method", "loraprune", "--ratio", "0.5",
                   "--layers", "all", "--steps", "4", "--batch-size", "1", "--seq-len", "32", "--no-eval",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "prunetune.json").read_text())
    assert record["training"]["processes"]["mode"] == "fsdp"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]["after"]["total"]


@pytest.mark.parametrize("command", [["prune", "--method", "taylor", "--quant", "8bit", "--recover-steps", "2"],
                                     ["shear", "--target", "layers=2"]])
def test_commands_not_sharded_yet_refuse_fsdp_before_loading(tmp_path, command, monkeypatch, no_model_load):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    source = save_tiny_model_dir(tmp_path / "tiny", "llama")
    done = run_cli(command[0], str(source), *command[1:], "--no-eval", "--eval-seq-len", "64", "--seq-len", "64",
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(done, "FSDP")
    assert not (tmp_path / "out").exists()
