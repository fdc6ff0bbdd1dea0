"""report.md of a run directory, and the side-by-side comparison of several runs.

A report is rebuilt from the directory alone (prunetune.json plus the saved unit scores), so
`prunetune report DIR` can redraw it at any time, for example after `prunetune eval DIR` added
task results. Sections appear only when the record has what they show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..structure.scores import SCORES_FILE, load_scores
from . import plots
from .rundir import extra_file, markdown_table, replace_file, write_json

RECORD_FILE = "prunetune.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


def is_run_directory(path) -> bool:
    return (Path(path) / RECORD_FILE).is_file()


def read_record(run_dir: Path) -> dict:
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a prunetune run directory (no {RECORD_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc.msg}, line {exc.lineno})") from None


# -- one run ----------------------------------------------------------------------------------------
def write_report(run_dir: Path, record: dict | None = None) -> Path:
    """Draw the plots into DIR/run/plots and write DIR/report.md; returns the report's path."""
    run_dir = Path(run_dir)
    record = record if record is not None else read_record(run_dir)
    plot_dir = extra_file(run_dir, PLOTS_DIR)
    plot_dir.mkdir(parents=True, exist_ok=True)
    lines = _header(record)
    lines += _settings(record)
    lines += _result(record)
    lines += _target(record)
    lines += _domains(record)
    lines += _evaluations(record.get("evaluations", []))
    lines += _kept_units(record, plot_dir)
    lines += _experts(record, plot_dir)
    lines += _scores(record, run_dir, plot_dir)
    lines += _training(record, plot_dir)
    path = run_dir / REPORT_FILE
    # images are linked relative to report.md (DIR/run/plots, or DIR/plots in an older run)
    text = "\n".join(lines).rstrip().replace("](" + PLOTS_DIR + "/",
                                             "](" + plot_dir.relative_to(run_dir).as_posix() + "/")
    replace_file(path, text + "\n")
    for folder in (plot_dir, plot_dir.parent):  # a run with nothing to plot keeps no empty folders
        if folder != run_dir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return path


def add_evaluation(run_dir: Path, evaluation: dict) -> None:
    """Append an evaluation (from `prunetune eval`) to a run's prunetune.json and redraw its report."""
    record = read_record(run_dir)
    record.setdefault("evaluations", []).append(evaluation)
    write_json(Path(run_dir) / RECORD_FILE, record)
    write_report(run_dir, record)


def _image(path: Path | None, alt: str) -> list[str]:
    return [f"![{alt}]({PLOTS_DIR}/{path.name})", ""] if path else []


def _header(record: dict) -> list[str]:
    title = " ".join(str(x) for x in (record.get("command"), record.get("method"), "of" if record.get("method") else "",
                                      record.get("source_model")) if x)
    line = f"Created {record.get('created', '?')} with prunetune {record.get('prunetune_version', '?')} on " \
           f"{record.get('device', '?')}"
    arch = record.get("architecture")
    if arch and "saved_as" in arch:
        line += f"; saved as `{arch['saved_as']}`" + (
            " (stock `from_pretrained` loads it)" if arch["stock_loadable"]
            else " (layers differ in shape: load with `prunetune.load_model`)")
    if "elapsed_seconds" in record:
        line += f"; took {record['elapsed_seconds']:.0f} s"
    return [f"# prunetune {title}", "", line + ".", ""]


def _settings(record: dict) -> list[str]:
    settings = record.get("settings")
    if not settings:
        return []
    rows = [[k, f"`{_short(v)}`"] for k, v in settings.items()]
    return ["## Settings", "", markdown_table(["setting", "value"], rows), ""]


def _short(value) -> str:
    """Settings as one line: a list of consecutive layer indices reads as a span."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value) \
            and value == list(range(value[0], value[0] + len(value))):
        return f"{value[0]}-{value[-1]}" if len(value) > 1 else str(value[0])
    if isinstance(value, list):
        return ",".join(_short(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value)


def _result(record: dict) -> list[str]:
    params = record.get("parameters")
    if not params or "before" not in params or "after" not in params:
        return _perplexities(record.get("results", {}).get("perplexity", []))
    lines = ["## Result", ""]
    if record.get("prunable"):
        lines += [f"Prunable parameters: {record['prunable']}.", ""]
    rows = [[label, f"{params['before'][key]:,}", f"{params['after'][key]:,}",
             f"{(params['after'][key] - params['before'][key]) / params['before'][key]:+.1%}"]
            for key, label in (("total", "parameters (total)"), ("non_embedding", "parameters (non-embedding)"),
                               ("prunable", "prunable parameters")) if key in params["before"]]
    results = record.get("results", {})
    if "perplexity_before" in results:
        b, a = results["perplexity_before"], results["perplexity_after"]
        rows.append([f"perplexity ({b['data']}, {b['seq_len']} tokens)", f"{b['perplexity']:.2f}",
                     f"{a['perplexity']:.2f}", f"{(a['perplexity'] - b['perplexity']) / b['perplexity']:+.1%}"])
    lines += [markdown_table(["", "before", "after", "change"], rows), ""]
    if "ratio_target" in params:
        lines += [f"Ratio of prunable parameters removed: target {params['ratio_target']:.3f}, "
                  f"achieved {params['ratio_achieved']:.3f}.", ""]
    if "perplexity_before" in results:
        lines += [f"Perplexity protocol: {results['perplexity_before']['protocol']}.", ""]
    return lines


def _target(record: dict) -> list[str]:
    """Sheared-LLaMA: the shape asked for, and how well the masks' expected size predicted the result."""
    target, params = record.get("target"), record.get("parameters", {})
    if not target or "expected_by_masks" not in params:
        return []
    return [f"Target shape `{target['spec']}` (head unit {target['head_unit']}): {params['after']['total']:,} "
            f"parameters, {params['target']:,} asked for; the masks' expected count at the end of pruning was "
            f"{params['expected_by_masks']:,} ({params['expected_error']:+.2%} from the real count).", ""]


def _domains(record: dict) -> list[str]:
    """Training domains: initial and final weights, reference losses, held-out perplexity after."""
    data = record.get("data")
    if not isinstance(data, dict) or "domains" not in data:
        return []
    perplexities = record.get("results", {}).get("domain_perplexity", {})
    rows = [[d["name"], f"`{d['data']}`", f"{d['initial_weight']:.3f}", f"{data['final_weights'][d['name']]:.3f}",
             f"{data['reference_losses'][d['name']]:.3f}",
             f"{perplexities[d['name']]['perplexity']:.3f}" if d["name"] in perplexities else "–"]
            for d in data["domains"]]
    lines = ["## Domains", "", markdown_table(["domain", "data", "initial weight", "final weight", "reference loss",
                                                "held-out perplexity after"], rows), ""]
    lines += [f"Dynamic batch loading {'on' if data['dynamic_loading'] else 'off (fixed mixture)'}; reference "
              f"losses: {data['reference_source']}.", ""]
    return lines


def _perplexities(results: list[dict]) -> list[str]:
    """Perplexities a run measured at its end (LoRAM's align and train)."""
    if not results:
        return []
    rows = [[p["data"], f"{p['perplexity']:.3f}", p["protocol"]] for p in results]
    return ["## Result", "", markdown_table(["perplexity on", "value", "protocol"], rows), ""]


def evaluation_rows(evaluation: dict) -> list[list[str]]:
    """Rows (measure, value, detail) of one `prunetune eval` record (see evaluate/harness.py)."""
    rows = [[f"perplexity {p['data']} ({p['split']}, {p['seq_len']} tokens)", f"{p['perplexity']:.3f}",
             f"{p['windows']} windows, {p['tokens_scored']:,} tokens"] for p in evaluation.get("perplexity", [])]
    for task in evaluation.get("tasks", []):
        metrics = ", ".join(f"{m} {task[m]:.4f}" for m in ("acc", "acc_norm") if task.get(m) is not None)
        metrics = metrics or ", ".join(f"{k} {v:.4f}" for k, v in task.get("other", {}).items())
        averaged = f"; averaged: {task['averaged']}" if task.get("averaged") else ""
        rows.append([f"{task['task']} ({task['n_shot']}-shot)", metrics, f"{task['samples']:,} samples{averaged}"])
    average = evaluation.get("average")
    if average:
        rows.append([f"average of {len(average['tasks'])} tasks", f"{average['value']:.4f}",
                     f"--average {average['metric']}" + (f"; left out: {', '.join(average['left_out'])}"
                                                         if average.get("left_out") else "")])
    return rows


def _evaluations(evaluations: list[dict]) -> list[str]:
    if not evaluations:
        return []
    lines = ["## Evaluation", ""]
    for evaluation in evaluations:
        lines += [f"`prunetune eval` on {evaluation.get('created', '?')}"
                  + (f" with adapter `{evaluation['lora']}`" if evaluation.get("lora") else "") + ":", ""]
        lines += [markdown_table(["measure", "value", "detail"], evaluation_rows(evaluation)), ""]
        lines += [f"- protocol ({p['data']}): {p['protocol']}" for p in evaluation.get("perplexity", [])]
        if evaluation.get("tasks") and evaluation.get("limit"):
            lines += [f"- at most {evaluation['limit']} samples per task: not comparable with published numbers"]
        lines.append("")
    return lines


def _kept_units(record: dict, plot_dir: Path) -> list[str]:
    kept = record.get("kept")
    if not kept:
        return []
    lines = ["## Kept units per layer", ""]
    lines += _image(plots.plot_kept_units(record, plot_dir / "kept_units.png"), "kept units per layer")
    rows, start = [], 0
    layers = kept["layers"]
    moe = bool(layers) and "experts" in layers[0]
    mlp = (lambda e: (e["num_experts"], e["expert_width"])) if moe else (lambda e: (e["num_channels"],))  # noqa: E731
    for i in range(1, len(layers) + 1):  # identical consecutive layers share one row
        key = lambda e: (e["num_heads"], e["num_kv_heads"], *mlp(e))  # noqa: E731
        if i == len(layers) or key(layers[i]) != key(layers[start]) or layers[i]["layer"] != layers[i - 1]["layer"] + 1:
            first, last = layers[start]["layer"], layers[i - 1]["layer"]
            rows.append([f"{first}" if first == last else f"{first}-{last}", *key(layers[start])])
            start = i
    columns = ["experts", "expert width"] if moe else ["MLP channels"]
    lines += [markdown_table(["layers", "query heads", "kv heads", *columns], rows), ""]
    return lines


def _experts(record: dict, plot_dir: Path) -> list[str]:
    """A mixture of experts' routing (calibration or LoRAPrune's training, and recovery training if any)
    and the budget's split."""
    experts = record.get("experts")
    if not experts:
        return []
    lines = ["## Experts", ""]
    chose = experts["routing"].get("calibration") or experts["routing"]["pruning"]
    during = "Calibration" if "calibration" in experts["routing"] else "LoRAPrune's training"
    kept = record.get("kept", {}).get("layers")
    lines += _image(plots.plot_routing(chose, plot_dir / "routing.png", kept), "routing per expert")
    never = chose["never_routed"]
    first = "so removed first" if during == "Calibration" else "so they scored nothing and went first"
    lines.append(f"{during} routed {chose['tokens']} tokens to {chose['top_k']} experts each. "
                 + (f"Never routed to, {first}: {', '.join(f'layer {i} expert {e}' for i, e in never)}."
                    if never else "Every expert was routed to at least once."))
    training = experts["routing"].get("training")
    if training:
        shares, _ = plots.routing_shares(training)
        lines.append(f"During recovery ({training['tokens']} tokens), the kept experts' shares of the picks ranged "
                     f"from {shares.min():.3f} to {shares.max():.3f}"
                     + (f"; never routed to: {len(training['never_routed'])} experts." if training["never_routed"]
                        else "."))
    budget = experts.get("budget")
    if budget:
        by_score = any("pruned_score" in c for c in budget["candidates"])
        measure = "pruned_score" if by_score else "calibration_loss"
        rows = [[c["experts_removed_per_layer"], c["expert_width"], c["head_fraction"], c["ratio"],
                 f"{c[measure]:.4f}" if measure in c else "–"] for c in budget["candidates"]]
        lines += ["", f"How the budget was shared ({budget['rule']}):", "",
                  markdown_table(["experts removed per layer", "expert width", "share of heads", "ratio",
                                  "score removed" if by_score else "calibration loss"], rows)]
    return lines + [""]


def score_groups(record: dict, scores) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scores of the units that were candidates (pruned layers and unit kinds), each divided by its
    layer's median, with whether the unit was kept."""
    settings = record.get("settings", {})
    units = settings.get("units", "heads,channels")
    head_unit = settings.get("head_unit", "kv-group")
    layers = set(settings.get("layers") or range(len(scores)))
    kept = {e["layer"]: e for e in record["kept"]["layers"]}
    groups: dict[str, tuple[list, list]] = {}

    def add(kind: str, values, kept_indices) -> None:
        values = values.float().numpy()
        median = np.median(values[values > 0]) if (values > 0).any() else 1.0
        flags = np.zeros(len(values), dtype=bool)
        flags[list(kept_indices)] = True
        group = groups.setdefault(kind, ([], []))
        group[0].append(values / median)
        group[1].append(flags)

    for i, layer in enumerate(scores):
        if i not in layers:
            continue
        entry = kept.get(i, {"heads": [], "kv_heads": [], "channels": []})
        if "heads" in units:
            if head_unit == "kv-group":
                add("kv groups", layer.head_unit_scores("kv-group"), entry["kv_heads"])
            else:
                add("query heads", layer.head_unit_scores("q-head"), entry["heads"])
        if "channels" in units:
            add("MLP channels", layer.channels, entry["channels"])
        if "experts" in units and layer.experts is not None:
            add("experts", layer.experts, entry.get("experts", []))
        if "expert-channels" in units and layer.expert_channels is not None:
            width = layer.expert_channels.shape[1]
            flat = [e * width + c for e, channels in zip(entry.get("experts", []), entry.get("expert_channels", []))
                    for c in channels]
            add("expert channels", layer.expert_channels.flatten(), flat)
    return {k: (np.concatenate(v), np.concatenate(f)) for k, (v, f) in groups.items()}


def _scores(record: dict, run_dir: Path, plot_dir: Path) -> list[str]:
    path = extra_file(run_dir, SCORES_FILE)
    if not path.is_file() or not record.get("kept"):
        return []
    criterion = record.get("method", "?")
    if criterion == "loraprune":
        criterion = "LoRA-guided, moving average at the end"
    image = plots.plot_unit_scores(score_groups(record, load_scores(path)), plot_dir / "unit_scores.png", criterion)
    return ["## Unit scores", "", *_image(image, "distribution of unit scores"),
            f"Scores of every candidate unit, divided by the median of its layer; the raw scores are in "
            f"`{path.relative_to(run_dir).as_posix()}`.", ""]


def _training(record: dict, plot_dir: Path) -> list[str]:
    training = record.get("training")
    if not training or not training.get("history"):
        return []
    ratio = record.get("parameters", {}).get("ratio_achieved")
    lines = ["## Training", ""]
    lines += _image(plots.plot_training(training, plot_dir / "training.png", ratio), "loss, learning rate, sparsity")
    lines += _image(plots.plot_domain_weights(training["history"], plot_dir / "domain_weights.png"),
                    "domain weights over steps")
    lines += _image(plots.plot_mask_sizes(training["history"], plot_dir / "masks.png"),
                    "expected kept units and Lagrange multipliers over steps")
    settings = training.get("settings", {})
    facts = [f"{len(training['history'])} steps"]
    if settings:
        facts.append(f"batch {settings.get('batch_size')}×{settings.get('seq_len')} tokens"
                     + (f", {settings['grad_accum']} micro-batches per step" if settings.get("grad_accum", 1) > 1
                        else ""))
    if "seconds" in training:
        facts.append(f"{training['seconds']:.0f} s")
    if training.get("peak_memory_bytes"):
        facts.append(f"peak memory {training['peak_memory_bytes'] / 2**30:.2f} GiB "
                     f"({training.get('peak_memory_kind')})")
    if training.get("resumed_from_step"):
        facts.append(f"resumed from step {training['resumed_from_step']}")
    lines += ["; ".join(facts) + ".", ""]
    return lines


# -- several runs -----------------------------------------------------------------------------------
def run_summary(name: str, record: dict) -> dict:
    """The numbers of one run that `prunetune report A B ...` puts side by side."""
    params = record.get("parameters", {})
    results = record.get("results", {})
    training = record.get("training", {})
    evaluations = record.get("evaluations", [])
    averages = [e["average"] for e in evaluations if e.get("average")]
    return {
        "run": name,
        "method": record.get("method") or record.get("command"),
        "source": record.get("source_model"),
        "ratio_target": params.get("ratio_target"),
        "ratio_achieved": params.get("ratio_achieved"),
        "parameters": params.get("after", {}).get("total"),
        "perplexity_before": results.get("perplexity_before", {}).get("perplexity"),
        "perplexity_after": results.get("perplexity_after", {}).get("perplexity"),
        "perplexity_protocol": results.get("perplexity_after", {}).get("protocol"),
        "task_average": averages[-1]["value"] if averages else None,
        "task_average_metric": averages[-1].get("metric") if averages else None,
        "train_steps": len(training.get("history", [])) or None,
        "train_seconds": training.get("seconds"),
        "peak_memory_gib": training["peak_memory_bytes"] / 2**30 if training.get("peak_memory_bytes") else None,
    }


COMPARE_COLUMNS = (
    ("run", "run", "{}"), ("method", "method", "{}"), ("ratio", "ratio_achieved", "{:.3f}"),
    ("parameters", "parameters", "{:,}"), ("ppl before", "perplexity_before", "{:.2f}"),
    ("ppl after", "perplexity_after", "{:.2f}"), ("task avg", "task_average", "{:.4f}"),
    ("steps", "train_steps", "{}"), ("train s", "train_seconds", "{:.0f}"), ("peak GiB", "peak_memory_gib", "{:.2f}"),
)


def format_summary(summary: dict) -> list[str]:
    return ["–" if summary[key] is None else fmt.format(summary[key]) for _, key, fmt in COMPARE_COLUMNS]


def compare_runs(run_dirs: list[Path], out: Path) -> tuple[list[dict], Path]:
    """Write OUT/report.md and OUT/comparison.png comparing the runs; returns the summaries."""
    names = _unique_names([Path(d) for d in run_dirs])
    records = [(name, read_record(d)) for name, d in zip(names, run_dirs)]
    summaries = [run_summary(name, record) for name, record in records]
    out = Path(out)
    figure = plots.plot_comparison(records, out / "comparison.png")
    protocols = sorted({s["perplexity_protocol"] for s in summaries if s["perplexity_protocol"]})
    lines = [f"# prunetune: {len(records)} runs compared", "",
             markdown_table([c for c, _, _ in COMPARE_COLUMNS], [format_summary(s) for s in summaries]), "",
             f"![comparison]({figure.name})", ""]
    lines += ["Runs: " + ", ".join(f"`{name}` = `{d}`" for name, d in zip(names, run_dirs)) + ".", ""]
    if protocols:
        lines += ["Perplexity protocol" + ("s differ, so the numbers do not compare:" if len(protocols) > 1 else ":"),
                  "", *[f"- {p}" for p in protocols], ""]
    replace_file(out / REPORT_FILE, "\n".join(lines))
    return summaries, out / REPORT_FILE


def _unique_names(dirs: list[Path]) -> list[str]:
    """Short run names: the directory name, or more of the path where two names clash."""
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    return names
