"""Run reports: report.md with PNG plots for every pruning run, and `prunetune report` comparisons."""

import json

import numpy as np
import pytest
from helpers import TASKS, assert_user_error, run_cli

from prunetune.structure.scores import SCORES_FILE, load_scores
from prunetune.runs.settings import EvalSettings, RunOptions
from prunetune.methods.prune import PruneSettings, prune
from prunetune.report import add_evaluation, read_record, write_report
from prunetune.report.markdown import score_groups
from prunetune.report.plots import kept_fractions, plot_domain_weights, sparsity_curve
from prunetune.training.loop import TrainSettings

PNG = b"\x89PNG\r\n\x1a\n"
EVAL = EvalSettings(data="builtin:pydoc", seq_len=32, max_windows=2)


@pytest.fixture(scope="module")
def runs(wide_model_dir, tmp_path_factory):
    """A LoRAPrune run and a one-shot Taylor run with recovery, on a tiny Llama."""
    root, model = tmp_path_factory.mktemp("runs"), wide_model_dir
    options = RunOptions(training=TrainSettings(steps=20, batch_size=2, seq_len=32, lr=1e-3), progress=False)
    prune(str(model), root / "lp", PruneSettings(method="loraprune", ratio=0.5, round_to=8), EVAL, options,
          log=lambda _: None)
    prune(str(model), root / "taylor", PruneSettings(method="taylor", ratio=0.3, round_to=8, recover_steps=4,
                                                     layers="1-3"), EVAL, options, log=lambda _: None)
    return root


def images_in(report: str) -> list[str]:
    return [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]


@pytest.mark.parametrize("run, expected", [
    ("lp", ["run/plots/kept_units.png", "run/plots/unit_scores.png", "run/plots/training.png"]),
    ("taylor", ["run/plots/kept_units.png", "run/plots/unit_scores.png", "run/plots/training.png"]),
])
def test_every_pruning_run_has_a_report_with_its_plots(runs, run, expected):
    report = (runs / run / "report.md").read_text()
    assert images_in(report) == expected
    for image in expected:
        assert (runs / run / image).read_bytes()[:8] == PNG
    for section in ("## Settings", "## Result", "## Kept units per layer", "## Unit scores", "## Training"):
        assert section in report
    assert "Perplexity protocol: builtin:pydoc eval split" in report


def test_kept_heatmap_and_score_groups_follow_the_masks(runs):
    record = read_record(runs / "taylor")
    grid, labels = kept_fractions(record)
    assert labels == ["query heads", "kv heads", "MLP channels"] and grid.shape == (3, 4)
    assert np.all(grid[:, 0] == 1.0)  # layer 0 was not pruned (--layers 1-3)
    for entry in record["kept"]["layers"]:
        source = record["architecture"]["source_layer_shapes"][entry["layer"]]
        assert grid[2, entry["layer"]] == entry["num_channels"] / source["intermediate"]
    scores = load_scores(runs / "taylor" / "run" / SCORES_FILE)
    assert len(scores) == 4 and scores[1].channels.shape == (128,)
    groups = score_groups(record, scores)
    kept = [e for e in record["kept"]["layers"] if e["layer"] in (1, 2, 3)]
    assert groups["MLP channels"][1].sum() == sum(e["num_channels"] for e in kept)
    assert len(groups["MLP channels"][0]) == 3 * 128  # only the candidate layers
    assert groups["kv groups"][1].sum() == sum(e["num_kv_heads"] for e in kept)


def test_sparsity_curve_follows_the_loraprune_schedule(runs):
    record = read_record(runs / "lp")
    steps, removed = sparsity_curve(record["training"], record["parameters"]["ratio_achieved"])
    assert steps == list(range(1, 21)) and removed[0] == 0.0
    assert removed == sorted(removed)  # a pruned unit never returns
    assert removed[-1] == pytest.approx(record["parameters"]["ratio_achieved"])
    recovery = read_record(runs / "taylor")
    _, constant = sparsity_curve(recovery["training"], recovery["parameters"]["ratio_achieved"])
    assert set(constant) == {recovery["parameters"]["ratio_achieved"]}


def test_domain_weights_are_drawn_only_when_logged(tmp_path):
    assert plot_domain_weights([{"step": 1, "loss": 2.0, "lr": 1e-4}], tmp_path / "none.png") is None
    history = [{"step": s, "domain_weights": {"code": 0.5 + 0.01 * s, "prose": 0.5 - 0.01 * s}} for s in range(10)]
    assert plot_domain_weights(history, tmp_path / "w.png").read_bytes()[:8] == PNG


def test_an_evaluation_added_to_a_run_appears_in_its_report(runs, tmp_path):
    import shutil

    run = tmp_path / "lp"
    shutil.copytree(runs / "lp", run)
    evaluation = {"created": "now", "perplexity": [read_record(run)["results"]["perplexity_after"]],
                  "tasks": [{"task": "tiny", "n_shot": 0, "acc": 0.5, "acc_norm": 0.6, "samples": 10,
                             "averaged": "acc", "other": {}}],
                  "average": {"metric": "paper", "value": 0.5, "tasks": {"tiny": "acc"}, "left_out": []},
                  "limit": None}
    add_evaluation(run, evaluation)
    assert read_record(run)["evaluations"] == [evaluation]
    report = (run / "report.md").read_text()
    assert "## Evaluation" in report
    assert "| tiny (0-shot) | acc 0.5000, acc_norm 0.6000 | 10 samples; averaged: acc |" in report
    assert "| average of 1 tasks | 0.5000 | --average paper |" in report


def test_report_redraws_a_run_in_place(runs, tmp_path):
    import shutil

    run = tmp_path / "taylor"
    shutil.copytree(runs / "taylor", run)
    shutil.rmtree(run / "run" / "plots")
    (run / "report.md").unlink()
    done = run_cli("report", run, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (run / "report.md").read_text() == (runs / "taylor" / "report.md").read_text().replace(
        str(runs / "taylor"), str(run))
    assert sorted(p.name for p in (run / "run" / "plots").iterdir()) == ["kept_units.png", "training.png",
                                                                         "unit_scores.png"]


def test_every_output_has_a_model_card_that_agrees_with_its_record(runs):
    from huggingface_hub import ModelCard

    for name, method in (("lp", "loraprune"), ("taylor", "taylor")):
        record = json.loads((runs / name / "prunetune.json").read_text())
        card = ModelCard.load(runs / name / "README.md")
        assert card.data.library_name == "prunetune" and {"pruned", method} <= set(card.data.tags)
        after = record["parameters"]["after"]["total"]
        assert f"{after:,}" in card.text
        assert f"{record['results']['perplexity_after']['perplexity']:,.2f}" in card.text


def test_output_top_level_holds_only_what_engines_read(runs):
    """vLLM loads every *.safetensors at the top of a model directory: scores and plots live in run/."""
    engine_files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "vocab.json",
                    "merges.txt"}
    for name in ("lp", "taylor"):
        top = {p.name for p in (runs / name).iterdir()}
        assert top - engine_files == {"prunetune.json", "report.md", "README.md", "run"}, top
        assert {"config.json", "model.safetensors"} <= top
        assert sorted(p.name for p in (runs / name / "run").iterdir()) == ["plots", SCORES_FILE]
        config = json.loads((runs / name / "config.json").read_text())
        per_layer = "prunetune_layer_shapes" in config
        assert config["architectures"] == (["PrunetuneForCausalLM"] if per_layer else ["LlamaForCausalLM"])
        assert not [k for k in config if k.startswith("_")]


def test_report_still_reads_a_run_of_the_older_layout(runs, tmp_path):
    """Runs made before run/ existed kept scores and plots at the top; report redraws them there."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(runs / "taylor", run)
    (run / "run" / SCORES_FILE).rename(run / SCORES_FILE)
    (run / "run" / "plots").rename(run / "plots")
    (run / "run").rmdir()
    (run / "report.md").unlink()
    done = run_cli("report", run, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert images_in((run / "report.md").read_text()) == [
        "plots/kept_units.png", "plots/unit_scores.png", "plots/training.png"]
    assert not (run / "run").exists() and (run / "plots" / "unit_scores.png").is_file()


def test_report_compares_runs_in_one_table_and_one_figure(runs, tmp_path):
    out = tmp_path / "compare"
    done = run_cli("report", runs / "lp", runs / "taylor", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "report.md"]
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| lp |") or line.startswith("| taylor |")]
    lp = json.loads((runs / "lp" / "prunetune.json").read_text())
    assert len(rows) == 2 and f"| loraprune | {lp['parameters']['ratio_achieved']:.3f} |" in rows[0]
    assert "| taylor |" in rows[1]
    assert f"{lp['results']['perplexity_after']['perplexity']:.2f}" in rows[0]


@pytest.mark.parametrize("args, fragments", [
    (("report", "{missing}"), ("is not a prunetune run directory",)),
    (("report", "{lp}", "{taylor}"), ("needs --out",)),
    (("report", "{lp}", "{taylor}", "--out", "{lp}"), ("already exists", "--overwrite")),
])
def test_report_errors_are_one_line_and_write_nothing(runs, tmp_path, args, fragments):
    before = sorted(p.name for p in tmp_path.iterdir())
    names = {"missing": tmp_path / "nope", "lp": runs / "lp", "taylor": runs / "taylor"}
    done = run_cli(*(a.format(**names) for a in args), cwd=tmp_path)
    assert_user_error(done, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_report_of_a_record_without_masks_or_training(tmp_path):
    """Reports also cover records of other commands: sections without data are left out."""
    (tmp_path / "prunetune.json").write_text(json.dumps({"command": "train", "source_model": "m",
                                                         "settings": {"a": 1}}))
    report = write_report(tmp_path).read_text()
    assert report.startswith("# prunetune train m") and "## Settings" in report and "![" not in report


def test_eval_of_a_run_directory_is_stored_in_it(runs, tmp_path):
    import shutil

    run = tmp_path / "taylor"
    shutil.copytree(runs / "taylor", run)
    done = run_cli("eval", run, "--tasks", "tiny_task", "--include-path", TASKS, "--data", "builtin:pydoc",
                   "--seq-len", "32", "--max-windows", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (evaluation,) = read_record(run)["evaluations"]
    assert evaluation["command"] == "eval" and evaluation["tasks"][0]["task"] == "tiny_task"
    assert evaluation["perplexity"][0]["protocol"].startswith("builtin:pydoc eval split")
    report = (run / "report.md").read_text()
    assert "## Evaluation" in report and "tiny_task (0-shot)" in report and "- protocol (builtin:pydoc)" in report
