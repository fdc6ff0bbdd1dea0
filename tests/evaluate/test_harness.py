"""Zero-/few-shot tasks through lm-evaluation-harness, offline: a ten-question task of our own
(tests/tasks) on tiny random models, through `prunetune eval` and through evaluate_model; with a
PEFT adapter on top (a zero B changes nothing), on a pruned model whose layers differ in shape, on
a group of tasks; and every user mistake as one `error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TASKS, assert_user_error, run_cli

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'prunetune[eval]')")

from prunetune import UserError, load_model  # noqa: E402
from prunetune.evaluate.adapter import load_adapter  # noqa: E402
from prunetune.evaluate.harness import evaluate_model  # noqa: E402

TASK_KEYS = {"task", "n_shot", "samples", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "other", "averaged"}


def save_adapter(model, directory: Path, zero_b: bool) -> Path:
    """A LoRA on every projection: PEFT's own initialisation (B = 0) or random B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], init_lora_weights=zero_b)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(directory)
    peft_model.unload()  # hand the base model back untouched
    return directory


@pytest.fixture(scope="module")
def zero_adapter(model_dir, tmp_path_factory) -> Path:
    model, _ = load_model(str(model_dir), device="cpu")
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "zero-b", zero_b=True)


@pytest.fixture(scope="module")
def cli_record(model_dir, tmp_path_factory) -> dict:
    """`prunetune eval` run once from a directory that is not the repository, with --json."""
    work = tmp_path_factory.mktemp("work")
    done = run_cli("eval", model_dir, "--tasks", "tiny_task", "--include-path", TASKS, "--data", "builtin:pydoc",
                   "--seq-len", "32", "--max-windows", "2", "--json", work / "eval.json", cwd=work)
    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr
    return {"stdout": done.stdout, "json": json.loads((work / "eval.json").read_text())}


def check_tiny_task(row: dict, samples: int = 10, n_shot: int = 0) -> None:
    assert set(row) == TASK_KEYS
    assert row["task"] == "tiny_task" and row["samples"] == samples and row["n_shot"] == n_shot
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= row[metric] <= 1.0 and row[f"{metric}_stderr"] >= 0.0


# ---------------------------------------------------------------------------------------------
# The command


def test_cli_prints_and_writes_tasks_perplexity_and_average(cli_record):
    record, stdout = cli_record["json"], cli_record["stdout"]
    assert record["command"] == "eval" and record["lora"] is None and record["parameters"]["total"] > 0
    (row,) = record["tasks"]
    check_tiny_task(row)
    # --average paper: a task outside the papers' list contributes its acc.
    assert row["averaged"] == "acc"
    assert record["average"] == {"metric": "paper", "value": row["acc"], "tasks": {"tiny_task": "acc"}, "left_out": []}
    (ppl,) = record["perplexity"]
    assert ppl["data"] == "builtin:pydoc" and ppl["windows"] == 2
    assert "non-overlapping 32-token windows" in ppl["protocol"]
    assert record["num_fewshot"] == 0 and record["limit"] is None and record["lm_eval_version"]
    for text in ("tiny_task", "average (paper)", "builtin:pydoc", "perplexity protocol", "--average paper",
                 f"{100 * row['acc']:.2f}"):
        assert text in stdout, text
    assert "warning" not in stdout


def test_python_function_gives_the_cli_numbers(model_dir, cli_record):
    model, tokenizer = load_model(str(model_dir), device="cpu")
    record = evaluate_model(model, tokenizer, tasks=["tiny_task"], include_path=TASKS, average="acc_norm")
    assert record["perplexity"] == []
    (row,) = record["tasks"]
    (cli_row,) = cli_record["json"]["tasks"]
    assert {k: v for k, v in row.items() if k != "averaged"} == {k: v for k, v in cli_row.items() if k != "averaged"}
    assert row["averaged"] == "acc_norm" and record["average"]["metric"] == "acc_norm"
    assert record["average"]["value"] == row["acc_norm"]
    json.dumps(record)  # JSON-ready as it is


def test_limit_and_few_shot(model_dir):
    model, tokenizer = load_model(str(model_dir), device="cpu")
    record = evaluate_model(model, tokenizer, tasks=["tiny_task"], include_path=TASKS, limit=3, num_fewshot=2)
    check_tiny_task(record["tasks"][0], samples=3, n_shot=2)
    assert record["limit"] == 3 and record["num_fewshot"] == 2
    from prunetune.cli.evaluation import _eval_notes

    assert any("warning: --limit 3" in note and "not comparable" in note for note in _eval_notes(record))


def test_a_group_is_one_row_over_its_members(model_dir):
    """Like mmlu: the group's row aggregates its members (tiny_task twice, with two prompts)."""
    model, tokenizer = load_model(str(model_dir), device="cpu")
    record = evaluate_model(model, tokenizer, tasks=["tiny_group"], include_path=TASKS)
    (row,) = record["tasks"]
    assert row["task"] == "tiny_group" and row["samples"] == 20 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    members = evaluate_model(model, tokenizer, tasks=["tiny_task", "tiny_task_b"], include_path=TASKS)["tasks"]
    assert row["acc"] == pytest.approx(sum(m["acc"] for m in members) / 2)


def test_a_local_json_task_as_the_readme_shows(model_dir, tmp_path):
    """`dataset_path: json` with an absolute data_files path works offline from any directory."""
    text = (TASKS / "tiny_task.yaml").read_text().replace(
        "custom_dataset: !function tiny_task.load",
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {TASKS / 'tiny_task.jsonl'}")
    (tmp_path / "tiny_task.yaml").write_text(text.replace("task: tiny_task", "task: tiny_json_task"))
    model, tokenizer = load_model(str(model_dir), device="cpu")
    record = evaluate_model(model, tokenizer, tasks=["tiny_json_task"], include_path=tmp_path)
    assert record["tasks"][0]["samples"] == 10
    (tmp_path / "tiny_task.yaml").write_text(text.replace(str(TASKS / "tiny_task.jsonl"), "no/such.jsonl"))
    with pytest.raises(UserError, match="relative data_files"):
        evaluate_model(model, tokenizer, tasks=["tiny_task"], include_path=tmp_path)


# ---------------------------------------------------------------------------------------------
# Adapters and pruned models


def test_zero_b_adapter_scores_exactly_like_the_base_model(model_dir, zero_adapter, cli_record):
    done = run_cli("eval", model_dir, "--adapter", zero_adapter, "--tasks", "tiny_task", "--include-path",
                   "tests/tasks", "--data", "builtin:pydoc", "--seq-len", "32", "--max-windows", "2",
                   "--json", zero_adapter.parent / "eval.json", cwd=ROOT)
    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    record = json.loads((zero_adapter.parent / "eval.json").read_text())
    base = cli_record["json"]
    assert record["lora"] == str(zero_adapter) and "adapter" in done.stdout
    assert record["tasks"] == base["tasks"] and record["average"] == base["average"]
    assert record["perplexity"][0]["nll"] == base["perplexity"][0]["nll"]


def test_adapter_on_a_pruned_model_with_layers_of_different_shapes(model_dir, tmp_path):
    from prunetune.export.hf import save_model
    from prunetune.structure.masks import Masks
    from prunetune.structure.surgery import cut
    from prunetune.structure.units import Structure

    model, tokenizer = load_model(str(model_dir), device="cpu")
    masks = Masks()
    for i in (1, 2):  # layers 1 and 2 lose a key/value group and half their MLP; 0 and 3 stay whole
        masks.heads[i] = Masks.heads_from_kv(torch.tensor([True, False, True]), 2)
        masks.channels[i] = torch.arange(48) % 2 == 0
    cut(model, masks)
    save_model(model, tokenizer, tmp_path / "pruned")
    pruned, tokenizer = load_model(str(tmp_path / "pruned"), device="cpu")
    assert len(set(Structure.of(pruned).layers)) == 2
    base = evaluate_model(pruned, tokenizer, data=["builtin:pydoc"], seq_len=32, max_windows=1,
                          tasks=["tiny_task"], include_path=TASKS)
    save_adapter(pruned, tmp_path / "adapter", zero_b=False)
    adapted = load_adapter(pruned, tmp_path / "adapter")
    assert any("lora_B" in name for name, _ in adapted.named_parameters())  # unmerged
    record = evaluate_model(adapted, tokenizer, data=["builtin:pydoc"], seq_len=32, max_windows=1,
                            tasks=["tiny_task"], include_path=TASKS)
    check_tiny_task(record["tasks"][0])
    check_tiny_task(base["tasks"][0])
    assert record["perplexity"][0]["nll"] != base["perplexity"][0]["nll"]  # a random B is not a no-op


# ---------------------------------------------------------------------------------------------
# Mistakes: one line each, exit 2, before the model is loaded


def test_unknown_task(model_dir, tmp_path):
    done = run_cli("eval", model_dir, "--tasks", "tiny_task,piqaa", "--include-path", TASKS, cwd=tmp_path)
    assert_user_error(done, "unknown lm-eval task 'piqaa'", "piqa", "lm-eval ls tasks")


def test_missing_adapter_directory(model_dir, tmp_path):
    done = run_cli("eval", model_dir, "--adapter", tmp_path / "nowhere", "--tasks", "tiny_task",
                   "--include-path", TASKS,
                   cwd=tmp_path)
    assert_user_error(done, "adapter", "no such directory")


def test_lm_eval_not_installed(model_dir, tmp_path):
    # A fresh process: in this one lm_eval may be imported already, and PYTHONPATH is read at start-up.
    (tmp_path / "lm_eval.py").write_text("raise ImportError('pretend lm-eval is missing')\n")
    done = run_cli("eval", model_dir, "--tasks", "tiny_task", cwd=tmp_path, fresh_process=True,
                   PYTHONPATH=str(tmp_path))
    assert_user_error(done, "lm-eval is not installed; pip install 'prunetune[eval]'")


def test_task_options_without_tasks(model_dir, tmp_path):
    done = run_cli("eval", model_dir, "--num-fewshot", "5", cwd=tmp_path)
    assert_user_error(done, "--tasks")
