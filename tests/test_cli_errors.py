"""The `prunetune` command as a user meets it: every mistake is one `error:` line on stderr, exit
code 2, no traceback, and nothing left on disk; help texts show an example; a small prune works
and refuses to overwrite its output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py, also without conftest.py

from tiny import save_tiny_model_dir  # noqa: E402

TIMEOUT = 120


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "prunetune.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and done.stderr.endswith("\n"), f"stderr is not one line: {done.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    if out.parent.exists():
        leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.partial-*"))
        assert not leftovers, f"partial output left behind: {leftovers}"


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (vocab 49152), 128 positions."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A supported library, an unsupported architecture; deliberately without a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(directory)
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
def test_prune_ratio_outside_zero_one(model_dir, work, ratio):
    out = work / "runs" / "out"
    done = run_cli("prune", model_dir, "--ratio", ratio, "--out", out, "--no-eval", cwd=work)
    assert_user_error(done, "--ratio")
    assert_no_output(out)


def test_prune_missing_model_path(work):
    out = work / "out"
    done = run_cli("prune", "./nope/model", "--out", out, "--no-eval", cwd=work)
    assert_user_error(done, "./nope/model")
    assert_no_output(out)


def test_prune_unsupported_architecture(gpt2_dir, work):
    (work / "runs").mkdir()
    out = work / "runs" / "gpt2"
    done = run_cli("prune", gpt2_dir, "--ratio", "0.2", "--out", out, "--eval-seq-len", "16", cwd=work)
    assert_user_error(done, "unsupported architecture", "gpt2")
    assert_no_output(out)
    (work / "runs").rmdir()  # the run made nothing inside it


def test_eval_unsupported_architecture(gpt2_dir, work):
    assert_user_error(run_cli("eval", gpt2_dir, "--seq-len", "16", cwd=work), "unsupported architecture")


def test_eval_empty_text_file(model_dir, work, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = run_cli("eval", model_dir, "--data", empty, "--seq-len", "32", cwd=work)
    assert_user_error(done, "empty", "builtin:pydoc")


def test_eval_seq_len_beyond_the_model_positions(model_dir, work):
    done = run_cli("eval", model_dir, "--seq-len", "4096", cwd=work)
    assert_user_error(done, "--seq-len", "128")


@pytest.mark.parametrize("extra, fragment", [
    (("--max-windows", "0"), "--max-windows"),
    (("--json", "no/such/dir/ppl.json"), "no directory"),
    (("--data", "builtin:pydoc@nowhere"), "unknown split"),
])
def test_eval_bad_options(model_dir, work, extra, fragment):
    assert_user_error(run_cli("eval", model_dir, "--seq-len", "32", *extra, cwd=work), fragment)


def test_prune_bad_eval_data_fails_before_any_output(model_dir, work):
    out = work / "out"
    done = run_cli("prune", model_dir, "--ratio", "0.5", "--out", out, "--eval-data", "missing.txt", cwd=work)
    assert_user_error(done, "no such data file")
    assert_no_output(out)


# ---------------------------------------------------------------------------------------------
# A small prune that works, and a second run that must not overwrite it


def test_prune_then_refuse_to_overwrite(model_dir, tmp_path):
    out = tmp_path / "out"
    args = ("prune", model_dir, "--ratio", "0.5", "--round-to", "8", "--out", out, "--max-windows", "2",
            "--eval-seq-len", "32")
    done = run_cli(*args, cwd=tmp_path)
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
