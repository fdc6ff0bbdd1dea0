"""The `prunetune` command as a user meets it: every mistake is one `error:` line on stderr, exit
code 2, no traceback, and nothing left on disk; help texts show an example; a small prune works
and refuses to overwrite its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TIMEOUT, assert_no_output, assert_user_error, run_cli, snapshot


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A supported library, an unsupported architecture; deliberately without a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """A tiny Llama's config.json and nothing else: enough for every check, never loadable."""
    from tiny import tiny_config

    directory = tmp_path_factory.mktemp("config-only")
    tiny_config("llama").save_pretrained(directory)
    return directory


@pytest.fixture
def work(tmp_path) -> Path:
    """The command's working directory; a run that fails must leave it as it found it."""
    directory = tmp_path / "work"
    directory.mkdir()
    yield directory
    assert not list(directory.iterdir()), f"left behind: {list(directory.iterdir())}"


# ---------------------------------------------------------------------------------------------
# Help


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_help_shows_an_example(command, tmp_path):
    done = run_cli(command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Example" in done.stdout and f"prunetune {command}" in done.stdout
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Mistakes


@pytest.mark.parametrize("ratio", ["0", "1.5"])
def test_prune_ratio_outside_zero_one(model_dir, work, ratio, no_model_load):
    out = work / "runs" / "out"
    done = run_cli("prune", model_dir, "--ratio", ratio, "--out", out, "--no-eval", cwd=work)
    assert_user_error(done, "--ratio")
    assert_no_output(out)


def test_prune_missing_model_path(work, no_model_load):
    out = work / "out"
    done = run_cli("prune", "./nope/model", "--out", out, "--no-eval", cwd=work)
    assert_user_error(done, "./nope/model")
    assert_no_output(out)


def test_prune_unsupported_architecture(gpt2_dir, work, no_model_load):
    (work / "runs").mkdir()
    out = work / "runs" / "gpt2"
    done = run_cli("prune", gpt2_dir, "--ratio", "0.2", "--out", out, "--eval-seq-len", "16", cwd=work)
    assert_user_error(done, "unsupported architecture", "gpt2")
    assert_no_output(out)
    (work / "runs").rmdir()  # the run made nothing inside it


def test_eval_unsupported_architecture(gpt2_dir, work, no_model_load):
    assert_user_error(run_cli("eval", gpt2_dir, "--seq-len", "16", cwd=work), "unsupported architecture")


def test_eval_empty_text_file(model_dir, work, tmp_path, no_model_load):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = run_cli("eval", model_dir, "--data", empty, "--seq-len", "32", cwd=work)
    assert_user_error(done, "empty", "builtin:pydoc")


def test_eval_seq_len_beyond_the_model_positions(model_dir, work, no_model_load):
    done = run_cli("eval", model_dir, "--seq-len", "4096", cwd=work)
    assert_user_error(done, "--seq-len", "128")


@pytest.mark.parametrize("extra, fragment", [
    (("--max-windows", "0"), "--max-windows"),
    (("--json", "no/such/dir/ppl.json"), "no directory"),
    (("--data", "builtin:pydoc@nowhere"), "unknown split"),
])
def test_eval_bad_options(model_dir, work, extra, fragment, no_model_load):
    assert_user_error(run_cli("eval", model_dir, "--seq-len", "32", *extra, cwd=work), fragment)


def test_prune_bad_eval_data_fails_before_any_output(model_dir, work, no_model_load):
    out = work / "out"
    done = run_cli("prune", model_dir, "--ratio", "0.5", "--out", out, "--eval-data", "missing.txt", cwd=work)
    assert_user_error(done, "no such data file")
    assert_no_output(out)


# ---------------------------------------------------------------------------------------------
# Every command checks what it can before it loads a model (`no_model_load`): data specs and files
# (every domain's), evaluation data, targets, adapters, output directories, flag combinations.

SMALL = ("--seq-len", "32", "--eval-seq-len", "32")  # within the tiny model's 128 positions


def save_adapter(directory: Path, b_rows: int) -> Path:
    """A PEFT LoRA adapter on layer 0's q_proj whose B has `b_rows` rows (the tiny Llama's q_proj: 96)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj"]}))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 96), f"{prefix}.lora_B.weight": torch.zeros(b_rows, 4)},
              str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize("args, fragments", [
    (("--data", "missing.txt"), ("no such data file", "missing.txt")),
    (("--data", "builtin:pydoc,missing.jsonl"), ("no such data file", "missing.jsonl")),
    (("--data", "notes.docx"), ("unknown data source",)),
    (("--data", "builtin:nothing"), ("unknown built-in source",)),
    (("--adapter", "no/adapter"), ("adapter 'no/adapter'", "no such directory")),
    (("--limit", "5"), ("--tasks",)),
    (("--quant", "4bit"), ("unknown quantization",)),
    (("--dtype", "float8"), ("unknown dtype",)),
    (("--batch-size", "0"), ("--batch-size",)),
])
def test_eval_mistakes_before_loading(config_dir, work, no_model_load, args, fragments):
    assert_user_error(run_cli("eval", config_dir, "--seq-len", "32", *args, cwd=work), *fragments)


def test_eval_missing_model(work, no_model_load):
    assert_user_error(run_cli("eval", "./no/model", cwd=work), "no such model", "./no/model")


def test_eval_adapter_of_other_shapes(config_dir, work, tmp_path, no_model_load):
    adapter = save_adapter(tmp_path / "adapter", b_rows=64)
    done = run_cli("eval", config_dir, "--adapter", adapter, "--seq-len", "32", cwd=work)
    assert_user_error(done, "does not fit", "q_proj is 96x96", "64x96")


def test_info_missing_model(work, no_model_load):
    assert_user_error(run_cli("info", "./no/model", cwd=work), "no such model")


def test_prune_missing_training_data(model_dir, work, no_model_load):
    out = work / "out"
    done = run_cli("prune", model_dir, "--method", "taylor", "--data", "missing.txt", "--out", out, "--no-eval",
                   cwd=work)
    assert_user_error(done, "no such data file", "missing.txt")
    assert_no_output(out)


def test_prune_existing_output(model_dir, tmp_path, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run_cli("prune", model_dir, "--method", "magnitude", "--ratio", "0.5", "--out", out, "--no-eval",
                   cwd=tmp_path)
    assert_user_error(done, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


TARGET = ("--target", "layers=3,heads=4,kv-heads=2,intermediate=32")


@pytest.mark.parametrize("command, args, fragments", [
    ("shear", (*TARGET, "--data", "code=builtin:stdlib-code,prose=missing.txt"),
     ("domain 'prose'", "no such data file", "missing.txt")),
    ("shear", (*TARGET, "--data", "code=builtin:stdlib-code,prose=builtin:pydoc@eval"), ("drop the '@eval'",)),
    ("shear", (*TARGET, "--eval-data", "missing.txt"), ("no such data file",)),
    ("shear", ("--target", "heads=5"), ("divisible",)),
    ("shear", (*TARGET, "--max-windows", "0"), ("--max-windows",)),
    ("shear", (*TARGET, "--eval-seq-len", "4096"), ("--eval-seq-len 4096", "128")),
    ("train", ("--data", "prose=missing.txt"), ("domain 'prose'", "no such data file")),
    ("train", ("--data", "domains.yaml"), ("no such domains file",)),
    ("train", ("--eval-data", "builtin:pydoc@test"), ("unknown split",)),
    ("train", ("--reference-model", "./no/model"), ("no such model",)),
    ("train", ("--dynamic-loading",), ("reference",)),
    ("train", ("--seq-len", "4096"), ("--seq-len 4096",)),
])
def test_shear_and_train_mistakes_before_loading(config_dir, work, no_model_load, command, args, fragments):
    out = work / "out"
    done = run_cli(command, config_dir, *SMALL, *args, "--out", out, cwd=work)
    assert_user_error(done, *fragments)
    assert_no_output(out)


@pytest.mark.parametrize("command", ["shear", "train"])
def test_shear_and_train_existing_output(config_dir, tmp_path, no_model_load, command):
    out = tmp_path / "out"
    out.mkdir()
    done = run_cli(command, config_dir, *(TARGET if command == "shear" else ()), *SMALL, "--out", out, cwd=tmp_path)
    assert_user_error(done, "already exists", "--overwrite")
    assert not list(out.iterdir())


@pytest.mark.parametrize("args, fragments", [
    (("train", "{model}", "--data", "missing.txt"), ("no such data file",)),
    (("train", "{model}", "--eval-data", "missing.txt"), ("no such data file", "missing.txt")),
    (("train", "{model}", "--quant", "4bit"), ("unknown --quant",)),
    (("train", "{model}", "--seq-len", "4096"), ("--seq-len 4096",)),
    (("prune", "{model}", "--method", "rand", "--criterion", "taylor"), ("--criterion applies to stru",)),
    (("prune", "{model}", "--method", "unst", "--data", "missing.txt"), ("no such data file",)),
    (("prune", "{model}", "--method", "unst", "--layers", "2-9"), ("layer",)),
    (("run", "{model}", "--method", "semi", "--ratio", "0.3"), ("semi",)),
    (("run", "{model}", "--criterion", "bogus"), ("unknown --criterion 'bogus'",)),
    (("run", "{model}", "--data", "missing.txt"), ("no such data file",)),
    (("run", "{model}", "--quant", "4bit"), ("unknown --quant",)),
    (("run", "{model}", "--seq-len", "32", "--eval-seq-len", "4096"), ("--eval-seq-len 4096",)),
])
def test_loram_mistakes_before_loading(config_dir, work, no_model_load, args, fragments):
    out = work / "out"
    done = run_cli("loram", *(str(a).format(model=config_dir) for a in args), "--out", out, cwd=work)
    assert_user_error(done, *fragments)
    assert_no_output(out)


@pytest.mark.parametrize("args, fragments", [
    (("masks-agree", "{model}", "--data", "missing.txt"), ("no such data file",)),
    (("masks-agree", "{model}", "--layers", "2-9"), ("layer",)),
    (("masks-agree", "{model}", "--seq-len", "4096"), ("--seq-len 4096",)),
    (("bench", "{model}", "./no/model", "--prompt-len", "16", "--decode-tokens", "4"), ("no such model",)),
    (("bench", "{model}", "--adapter", "no/adapter", "--prompt-len", "16", "--decode-tokens", "4"),
     ("adapter 'no/adapter'",)),
    (("bench", "{model}", "--json", "no/dir/speed.json"), ("no directory",)),
    (("bench-criterion", "--model", "./no/model"), ("no such model",)),
    (("report", "no/run"), ("no/run",)),
])
def test_other_commands_mistakes_before_loading(config_dir, work, no_model_load, args, fragments):
    assert_user_error(run_cli(*(str(a).format(model=config_dir) for a in args), cwd=work), *fragments)


def test_importing_the_cli_imports_no_torch():
    """`prunetune --help` and argument errors answer at once: torch and the libraries above it are
    imported by the commands that need them."""
    code = ("import sys, prunetune, prunetune.cli\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate', 'datasets') "
            "if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args", [("--help",), ("eval", "--help"), ("loram", "train", "--help"), ("eval",),
                                  ("shear", "model", "--bogus")])
def test_help_and_argument_errors_import_no_torch(args, tmp_path):
    """The CLI's own answers, run as a user runs them, with torch made unimportable."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch must not be imported here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), COLUMNS="120")
    done = subprocess.run([sys.executable, "-m", "prunetune.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 2)


def test_a_command_past_its_timeout_fails_the_test(tmp_path, monkeypatch):
    """run_cli's timeout holds in this process as it does for a fresh one: a command that does not
    finish raises TimeoutExpired instead of hanging the suite, and the alarm is off afterwards."""
    import signal
    import time

    import prunetune.cli

    def hang(**kwargs):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(prunetune.cli, "app", hang)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("info", "model", cwd=tmp_path, timeout=0.5)
    assert time.monotonic() - started < 30
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


# ---------------------------------------------------------------------------------------------
# A small prune that works, and a second run that must not overwrite it


def test_prune_then_refuse_to_overwrite(model_dir, tmp_path):
    out = tmp_path / "out"
    args = ("prune", model_dir, "--method", "magnitude", "--ratio", "0.5", "--round-to", "8", "--out", out,
            "--max-windows", "2", "--eval-seq-len", "32")
    done = run_cli(*args, cwd=tmp_path, fresh_process=True)  # a whole run in a process of its own, as a user's
    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr
    for name in ("prunetune.json", "config.json", "report.md"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".out.partial-*"))
    record = json.loads((out / "prunetune.json").read_text())
    assert record["command"] == "prune" and record["parameters"]["ratio_target"] == 0.5
    assert record["results"]["perplexity_before"]["windows"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] % 8 == 0 and config["intermediate_size"] < 48

    before = snapshot(out)
    again = run_cli(*args, cwd=tmp_path)
    assert_user_error(again, "already exists", "--overwrite")
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".out.partial-*"))
