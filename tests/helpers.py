"""The `prunetune` command as the tests run it, and the checks of what a user's mistake must look like.

`run_cli` starts the command in a fresh process. Under the `no_model_load` fixture (conftest.py) it
starts it through REFUSING_CLI, where any model load fails loudly: a bad input must be reported
before a model is loaded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent  # tests/: tiny.py, the *_run.py scripts, tasks/
ROOT = TESTS.parent
TASKS = TESTS / "tasks"  # the offline lm-eval tasks
TIMEOUT = 180
REFUSE_ENV = "PRUNETUNE_TEST_REFUSE_MODEL_LOADS"

# The CLI as `python -c` runs it under the `no_model_load` fixture: when prunetune.models is first
# imported, the function every load_model call ends in (the tokenizer and the weights, after the checks
# of the spec and the config) is replaced by one that fails with a traceback and exit code 1. The hook
# waits for that import, so commands that never import torch still do not.
REFUSING_CLI = """
import importlib.machinery
import sys


class RefuseModelLoads:
    def find_spec(self, name, path=None, target=None):
        if name != "prunetune.models":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)

            def refuse(source, *args, **kwargs):
                raise AssertionError(f"{source.describe()} was loaded before the mistake was reported")

            module._load_weights = refuse

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, RefuseModelLoads())
sys.argv[0] = "prunetune"
from prunetune.cli import main

main()
"""


def run_cli(*args, cwd: Path, timeout: int = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """`prunetune ARGS...` in a fresh process, offline, in `cwd`, with `env` added to the environment."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               COLUMNS="120", **env)
    entry = ["-c", REFUSING_CLI] if env.get(REFUSE_ENV) else ["-m", "prunetune.cli"]
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user's mistake: exit code 2, no traceback, one `error: ...` line on stderr holding every fragment."""
    assert done.returncode == 2, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and done.stderr.endswith("\n"), f"stderr is not one line: {done.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_output(out: Path) -> None:
    """Neither the output nor a temporary sibling of it (report/rundir.py) was left behind."""
    assert not out.exists(), f"{out} was left behind"
    if out.parent.exists():
        leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.partial-*"))
        assert not leftovers, f"partial output left behind: {leftovers}"


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under `directory` by relative path: (sha256, mtime in ns)."""
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_resume_matches(fresh, blocks, mask, settings, checkpoint_dir: Path, stop_after: int, resumed_from: int):
    """A LoRAPrune run stopped after `stop_after` steps and resumed in a "new process" (`fresh()` builds
    the model, its structure and its pruner again; nothing but the checkpoint survives) ends with the
    uninterrupted run's masks, adapter weights and losses. Returns the resumed run's pruner."""
    import pytest
    import torch

    from prunetune.training.loop import train

    model, structure, pruner = fresh()
    whole = train(model, blocks, mask, settings, hooks=pruner, progress=False)
    expected_masks = pruner.finish().kept_summary(structure)
    expected_lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    model, structure, pruner = fresh()
    train(model, blocks, mask, settings, hooks=pruner, checkpoint_dir=checkpoint_dir, stop_after=stop_after,
          progress=False)
    model, structure, pruner = fresh()
    resumed = train(model, blocks, mask, settings, hooks=pruner, checkpoint_dir=checkpoint_dir, resume=True,
                    progress=False)
    assert resumed.resumed_from_step == resumed_from
    assert pruner.finish().kept_summary(structure) == expected_masks
    for name, value in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(value, expected_lora[name], atol=1e-6), name
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], abs=1e-6)
    return pruner
