"""Zero- and few-shot tasks through lm-evaluation-harness, on a model already in memory.

`evaluate_model` is the one entry point: perplexity on prunetune's own data specs and lm-eval
tasks, on any model `prunetune.load_model` returns (pruned models whose layers differ in shape
included) with or without an unmerged PEFT adapter (`evaluate.adapter.load_adapter`). lm-eval is an optional extra:
`pip install 'prunetune[eval]'`.

The average over tasks is an unweighted mean of one accuracy per task; `--average` picks which:
  acc       plain accuracy (tasks without it are left out of the average)
  acc_norm  length-normalised accuracy, plain accuracy where a task has no acc_norm
  paper     the per-task choice of the LLM-Pruner and LoRAPrune tables (PAPER_METRIC), acc elsewhere
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from packaging.version import Version
from torch import nn

from ..errors import UserError
from .perplexity import perplexity

INSTALL_HINT = "lm-eval is not installed; pip install 'prunetune[eval]'"
AVERAGES = ("paper", "acc", "acc_norm")
MIN_LM_EVAL = Version("0.4.10")  # the first release that imports with transformers 5 (see pyproject.toml)
# LLM-Pruner's zero-shot table (copied by LoRAPrune and later pruning papers) reports acc_norm for
# HellaSwag, ARC-c and OBQA and acc for BoolQ, PIQA, WinoGrande and ARC-e: re-running its released
# evaluation gives the paper's numbers with exactly this choice (horseee/LLM-Pruner issue #25).
PAPER_METRIC = {
    "boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
}


@dataclass
class TaskResult:
    task: str
    n_shot: int
    samples: int  # documents scored (after --limit)
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    other: dict[str, float] = field(default_factory=dict)  # every other metric lm-eval reported
    averaged: str | None = None  # the metric this task contributes to the average (None: left out)

    def to_dict(self) -> dict:
        return asdict(self)


def _lm_eval():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("lm_eval")
    except PackageNotFoundError:
        raise UserError(INSTALL_HINT) from None
    if not MIN_LM_EVAL <= Version(installed) < Version("0.5"):
        raise UserError(f"lm-eval {installed} is installed; prunetune needs >={MIN_LM_EVAL},<0.5 (older releases "
                        "do not import with transformers 5): pip install 'prunetune[eval]'")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO/WARNING chatter, not its progress bars
    return lm_eval, HFLM, TaskManager


def parse_list(text: str | None) -> list[str]:
    """'piqa, hellaswag,,boolq' -> ['piqa', 'hellaswag', 'boolq'], first occurrence kept."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return list(dict.fromkeys(items))


_MANAGERS: dict = {}  # (include_path, tasks) -> TaskManager, so the CLI's early check is not paid twice


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """An lm-eval TaskManager that knows every name in `tasks`; a one-line UserError otherwise.

    Indexing lm-eval's own few thousand task files takes seconds, so tasks found in
    `include_path` alone are served by an index of that directory only.
    """
    _, _, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path '{include_path}' is not a directory of lm-eval task YAML files")
    key = (str(include_path) if include_path else None, tuple(tasks))
    if key in _MANAGERS:
        return _MANAGERS[key]
    manager = None
    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        import difflib

        close = sorted({m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=3)})
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown lm-eval task {', '.join(repr(t) for t in unknown)}{hint}; list the tasks with "
                        "`lm-eval ls tasks`, or pass --include-path DIR for your own task YAML files")
    _MANAGERS[key] = manager
    return manager


@contextmanager
def _own_rng_and_no_git():
    """lm-eval reseeds the global generators and shells out to `git`; keep both from leaking out."""
    from unittest import mock

    import numpy as np
    from lm_eval import evaluator

    states = random.getstate(), np.random.get_state()
    try:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            if hasattr(evaluator, "get_git_commit_hash"):  # prints 'fatal: not a git repository' outside one
                with mock.patch.object(evaluator, "get_git_commit_hash", lambda: None):
                    yield
            else:
                yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def _metrics(entry: dict) -> dict[str, float]:
    """lm-eval's {'acc,none': x, 'acc_stderr,none': s, 'alias': ...} -> {'acc': x, 'acc_stderr': s}."""
    metrics = {}
    for key, value in entry.items():
        if "," not in key or not isinstance(value, (int, float)):  # names, aliases, 'N/A' stderr
            continue
        name, filt = key.split(",", 1)
        metrics[name if filt == "none" else f"{name},{filt}"] = float(value)
    return metrics


def _leaves(name: str, groups: dict) -> list[str]:
    children = groups.get(name)
    if not children:  # a task (older lm-eval lists tasks as groups without children)
        return [name]
    return [leaf for child in children for leaf in _leaves(child, groups)]


def averaged_metric(task: str, metrics: dict, average: str) -> str | None:
    """Which metric of `task` goes into the average; None when it has no accuracy."""
    wanted = PAPER_METRIC.get(task, "acc") if average == "paper" else average
    for metric in (wanted, "acc"):
        if metric in metrics:
            return metric
    return None


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], *, num_fewshot: int = 0, limit: int | None = None,
              include_path: str | Path | None = None, batch_size: int = 1, average: str = "paper") -> list[TaskResult]:
    """Run lm-eval tasks on `model` as it is in memory; one TaskResult per task or group asked for."""
    if average not in AVERAGES:
        raise UserError(f"unknown --average '{average}'; use {', '.join(AVERAGES)}")
    lm_eval, HFLM, _ = _lm_eval()
    manager = task_manager(tasks, include_path)
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with _own_rng_and_no_git():
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False)
    except ValueError as exc:
        if "uplicate" not in str(exc) and "multiple groups" not in str(exc):
            raise
        reason = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"{reason}; ask for a group or for its members, not both") from None
    except (ConnectionError, FileNotFoundError) as exc:  # the task's data: no network, or a missing local file
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the data of {', '.join(tasks)} ({reason}); lm-eval downloads task data from "
                        "the Hugging Face hub once and caches it; offline, use --include-path with a task YAML on "
                        "local files (relative data_files paths are read from the current directory)") from None
    finally:
        model.train(was_training)
    return task_rows(out, tasks, num_fewshot, average)


def task_rows(out: dict, asked: list[str], num_fewshot: int, average: str) -> list[TaskResult]:
    """simple_evaluate's output -> one TaskResult per task, tag member or group asked for."""
    groups = out.get("group_subtasks", {})
    members = {n for children in groups.values() for child in children for n in (child, *_leaves(child, groups))}
    shots = out.get("n-shot", {})
    rows = []
    for name, entry in out["results"].items():
        if name in members and name not in asked:  # part of a group asked for: counted in the group's row
            continue
        metrics = _metrics(entry)
        leaves = _leaves(name, groups)
        row = TaskResult(task=name, n_shot=int(shots.get(name, shots.get(leaves[0], num_fewshot))),
                         samples=sum(int(out["n-samples"].get(leaf, {}).get("effective", 0)) for leaf in leaves),
                         averaged=averaged_metric(name, metrics, average))
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            setattr(row, key, metrics.pop(key, None))
        row.other = metrics
        rows.append(row)
    return rows


def average_row(rows: list[TaskResult], average: str) -> dict | None:
    """{'metric': average, 'value': mean, 'tasks': {task: metric used}, 'left_out': [...]}."""
    used = {r.task: r.averaged for r in rows if r.averaged}
    if not used:
        return None
    values = [getattr(r, r.averaged) for r in rows if r.averaged]
    return {"metric": average, "value": sum(values) / len(values), "tasks": used,
            "left_out": [r.task for r in rows if not r.averaged]}


def evaluate_model(model: nn.Module, tokenizer, *, data: list[str] = (), tasks: list[str] = (), seq_len: int = 256,
                   batch_size: int = 1, max_windows: int | None = None, num_fewshot: int = 0,
                   limit: int | None = None, include_path: str | Path | None = None, average: str = "paper",
                   progress: bool = True) -> dict:
    """Perplexity on each data spec and lm-eval's score on each task, as one JSON-ready record:

        {"perplexity": [PerplexityResult.to_dict(), ...],   # one per data spec, protocol included
         "tasks": [TaskResult.to_dict(), ...],              # task, n_shot, samples, acc(+stderr),
                                                            # acc_norm(+stderr), other, averaged
         "average": {"metric": "paper"|"acc"|"acc_norm", "value": float,
                     "tasks": {task: metric used}, "left_out": [tasks without an accuracy]} or None,
         "num_fewshot": int, "limit": int or None,           # limit set: not comparable with papers
         "lm_eval_version": str or None}

    Accuracies are fractions in [0, 1]. `batch_size` is windows (perplexity) or requests (tasks)
    per forward pass. The model is left in the train/eval mode it came in.
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if average not in AVERAGES:
        raise UserError(f"unknown --average '{average}'; use {', '.join(AVERAGES)}")
    if tasks:
        task_manager(list(tasks), include_path)  # unknown names fail before any perplexity work
    record = {"perplexity": [], "tasks": [], "average": None, "num_fewshot": num_fewshot, "limit": limit,
              "lm_eval_version": None}
    for spec in data:
        result = perplexity(model, tokenizer, spec, seq_len, batch_size=batch_size, max_windows=max_windows,
                            progress=progress)
        record["perplexity"].append(result.to_dict())
    if tasks:
        import lm_eval

        rows = run_tasks(model, tokenizer, list(tasks), num_fewshot=num_fewshot, limit=limit,
                         include_path=include_path, batch_size=batch_size, average=average)
        record["tasks"] = [r.to_dict() for r in rows]
        record["average"] = average_row(rows, average)
        record["lm_eval_version"] = lm_eval.__version__
    return record
