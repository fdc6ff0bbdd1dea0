"""The `prunetune` command as the tests run it, and the checks of what a user's mistake must look like.

`run_cli` runs the command as the console script does (`prunetune.cli.main`), in the test's own
process, with the command's own argv, working directory, environment, stdout and stderr: a fresh
interpreter would spend seconds importing torch for every command, and the suite runs hundreds. What
only a fresh process shows (an import-time effect, a warning printed once per interpreter, an
environment variable read at start-up such as PYTHONPATH) is checked with `fresh_process=True`; the
tests that do so say why. Under the `no_model_load` fixture (conftest.py) any model load fails loudly
in either form: a bad input must be reported before a model is loaded.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import traceback
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
REFUSAL = "{} was loaded before the mistake was reported"  # what either form's refused load raises
REFUSING_CLI = f"""
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
                raise AssertionError({REFUSAL!r}.format(source.describe()))

            module._load_weights = refuse

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, RefuseModelLoads())
sys.argv[0] = "prunetune"
from prunetune.cli import main

main()
"""


def run_cli(*args, cwd: Path, timeout: int = TIMEOUT, fresh_process: bool = False,
            **env: str) -> subprocess.CompletedProcess:
    """`prunetune ARGS...`, offline, in `cwd`, with `env` added to the environment: its exit code, stdout
    and stderr. In this process unless `fresh_process` (see the module's docstring). Past `timeout`
    seconds either form raises subprocess.TimeoutExpired."""
    env = dict(CLI_ENV, **env)
    args = [str(a) for a in args]
    if fresh_process:
        env = dict(os.environ, **env)
        entry = ["-c", REFUSING_CLI] if env.get(REFUSE_ENV) else ["-m", "prunetune.cli"]
        return subprocess.run([sys.executable, *entry, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    started_only = sorted(name for name in env if name.startswith("PYTHON"))
    if started_only:
        raise TypeError(f"{started_only} take effect when an interpreter starts: pass fresh_process=True")
    return _run_in_this_process(args, cwd, env, timeout)


# What every command sees, in either form. The libraries are imported before any command runs here, so
# what the CLI sets for them through the environment (prunetune.cli._quiet_libraries) conftest.py sets
# before they are imported.
CLI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "120"}


def _run_in_this_process(args: list[str], cwd: Path, env: dict[str, str],
                         timeout: float) -> subprocess.CompletedProcess:
    """`main()` as the console script calls it; what it changes of the process (argv, working directory,
    environment, a refused model load) is put back after."""
    from unittest import mock

    from prunetune import models
    from prunetune.cli import main

    def refuse(source, *args, **kwargs):
        raise AssertionError(REFUSAL.format(source.describe()))

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        stack.enter_context(mock.patch.object(sys, "argv", ["prunetune", *args]))
        stack.enter_context(_working_directory(cwd))
        if os.environ.get(REFUSE_ENV):  # set by the no_model_load fixture or by `env`
            stack.enter_context(mock.patch.object(models, "_load_weights", refuse))
        stack.enter_context(contextlib.redirect_stdout(stdout))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        stack.enter_context(_time_limit(timeout, ["prunetune", *args]))
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:  # what the interpreter prints for an uncaught exception, and its exit code
            traceback.print_exc(file=stderr)
            code = 1
    gc.collect()  # the command's model, before the next test builds its own
    return subprocess.CompletedProcess(["prunetune", *args], code, stdout.getvalue(), stderr.getvalue())


class _TimedOut(BaseException):
    """The alarm of `_time_limit`: not an Exception, so neither the command nor run_cli's own handler of
    uncaught exceptions takes it for the command's error."""


@contextlib.contextmanager
def _time_limit(seconds: float, command: list[str]):
    """subprocess.run's timeout for a command run in this process: SIGALRM interrupts it (between Python
    bytecodes: a call into torch that never returns is not interrupted) and the test fails with
    TimeoutExpired instead of hanging the suite. Only the main thread receives signals; pytest runs tests
    there, and elsewhere the command runs without a limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _TimedOut:
        raise subprocess.TimeoutExpired(command, seconds) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _working_directory(path: Path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


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


def masked_then_cut(model, masks, x, seed: int | None = 0):
    """Sheared-LLaMA's masks on `model`: its logits on `x` under the masks (eval gates), then the model
    folded and cut in place, and the cut model's logits. With a `seed` the mask logits are first drawn
    at random, spread over the clamp range, so gates of every kind (0, 1, between) occur."""
    import torch

    from prunetune.structure.surgery import cut

    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in masks.mask_parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 2)
    with masks.attach(model), torch.no_grad():
        masked = model(x).logits
    final, values = masks.final()
    masks.fold_into(model, values)
    cut(model, final)
    with torch.no_grad():
        return masked, model(x).logits
