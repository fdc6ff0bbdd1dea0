"""`prunetune eval`, `info`, `bench`, `bench-criterion` and `report`: measuring models and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UserError
from . import options
from .common import check_json_path, out
from .flags import deprecating_command
from .options import MODEL_HELP

commands = typer.Typer()


@commands.command("eval", cls=deprecating_command("eval"), epilog="Examples:\n\n"
             "prunetune eval runs/mag20 --data wikitext2,ptb --seq-len 128 --json ppl.json\n\n"
             "prunetune eval runs/mag20 --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,boolq\n\n"
             "prunetune eval runs/mag20 --tasks mmlu --num-fewshot 5 --adapter runs/mag20-adapter\n\n"
             "prunetune eval runs/mag20 --tasks my_task --include-path my_tasks/ --limit 100")
def eval_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, show_default=False, help="Perplexity data, comma-separated: "
                                       "builtin:pydoc, builtin:stdlib-code, wikitext2, ptb, c4, or a .txt/.jsonl/"
                                       ".json/.parquet file; append @train, @eval or @all to pick the split. A "
                                       "file is scored whole (your test set; FILE@eval: its held-out tenth), "
                                       "the others on their eval split. Default: builtin:pydoc, or none when "
                                       "--tasks is given."),
    tasks: Optional[str] = typer.Option(None, show_default=False, help="lm-evaluation-harness tasks, "
                                        "comma-separated (e.g. piqa,hellaswag,boolq or mmlu); needs "
                                        "pip install 'prunetune\\[eval]'."),
    num_fewshot: int = typer.Option(0, help="Tasks: in-context examples per question (0: zero-shot)."),
    limit: Optional[int] = typer.Option(None, help="Tasks: score only the first N samples of each, for a quick "
                                        "look (not comparable with published numbers)."),
    include_path: Optional[Path] = typer.Option(None, help="Tasks: a directory of your own lm-eval task YAML "
                                                "files (e.g. offline tasks on local jsonl files)."),
    average: str = typer.Option("paper", help="Tasks: the accuracy averaged over tasks: paper (acc_norm for "
                                "hellaswag, arc_challenge, openbookqa, acc elsewhere: the LLM-Pruner and "
                                "LoRAPrune tables), acc, or acc_norm (acc where a task has no acc_norm)."),
    lora: Optional[Path] = options.adapter("evaluated on top of the model, unmerged."),
    seq_len: int = typer.Option(256, help="Perplexity window length in tokens (128 for LLM-Pruner tables, "
                                "2048 for most others): what the training commands call --eval-seq-len."),
    batch_size: int = options.batch_size(1, why="Here: perplexity windows, or task requests, per forward pass."),
    max_windows: Optional[int] = options.max_windows(),
    json_path: Optional[Path] = options.json_path("every result"),
    dtype: str = options.dtype(),
    device: str = options.device(),
    quant: Optional[str] = options.quant(),
) -> None:
    """Perplexity over non-overlapping windows and zero-/few-shot tasks (lm-evaluation-harness)."""
    import time

    from ..data import eval_command_spec, load_examples
    from ..evaluate.adapter import adapter_mismatch, adapter_modules, check_adapter_dir, load_adapter
    from ..evaluate.harness import AVERAGES, evaluate_model, parse_list, task_manager
    from ..models import check_load_options, check_model, load_model, resolve_model_spec
    from ..runs.settings import EvalSettings
    from ..structure.units import count_parameters

    task_list = parse_list(tasks)
    # A file given here is the user's test set, scored whole unless a split is named.
    data_list = [eval_command_spec(d) for d in parse_list(data) or ([] if task_list else ["builtin:pydoc"])]
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    EvalSettings(data=None, max_windows=max_windows).check()  # its window length is --seq-len here: below
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if (limit is not None or include_path or num_fewshot) and not task_list:
        raise UserError("--limit, --include-path and --num-fewshot apply to --tasks; name the tasks to run")
    if average not in AVERAGES:
        raise UserError(f"unknown --average '{average}'; use {', '.join(AVERAGES)}")
    if lora is not None:
        check_adapter_dir(lora)
    check_json_path(json_path)
    # Everything else before the model loads, cheapest first: a mistake costs seconds, not a load.
    resolve_model_spec(model)
    check_load_options(dtype, device, quant)
    for spec in data_list:
        load_examples(spec)  # unknown source or split, missing, empty or malformed file
    config = check_model(model, {"--seq-len": seq_len} if data_list else {})
    if lora is not None:
        misfit = adapter_mismatch(adapter_modules(str(lora)), config)
        if misfit:
            raise UserError(f"the adapter in '{lora}' does not fit {model} ({misfit}); load it on the model it "
                            "was trained on")
    if task_list:
        task_manager(task_list, include_path)  # lm-eval installed, every task known
    from ..report import add_evaluation, is_run_directory, provenance, write_json

    start = time.perf_counter()
    loaded, tokenizer = load_model(model, dtype=dtype, device=device, quant=quant)
    params = count_parameters(loaded)
    if lora is not None:
        loaded = load_adapter(loaded, lora)
    record = evaluate_model(loaded, tokenizer, data=data_list, tasks=task_list, seq_len=seq_len,
                            batch_size=batch_size, max_windows=max_windows, num_fewshot=num_fewshot, limit=limit,
                            include_path=include_path, average=average)
    elapsed = time.perf_counter() - start
    title = f"{model}" + (f" + adapter {lora}" if lora else "")
    out.print(_eval_table(record, title))
    for notes in _eval_notes(record):
        out.print(notes)
    out.print(f"parameters: {params['total']:,} total, {params['non_embedding']:,} non-embedding"
              + (" (adapter not counted)" if lora else "") + f"; took {elapsed:.1f}s")
    result = provenance("eval", model=model, lora=str(lora) if lora else None, parameters=params,
                        elapsed_seconds=elapsed, **record)
    if json_path:
        write_json(json_path, result)
    if is_run_directory(model):  # a prunetune output keeps its evaluations and shows them in its report
        add_evaluation(model, result)
        out.print(f"added to {Path(model) / 'prunetune.json'} and {Path(model) / 'report.md'}")


def _eval_table(record: dict, title: str) -> Table:
    """Perplexity rows, task rows and the average in one table."""
    def percent(value, stderr):
        return "" if value is None else f"{100 * value:.2f}" + (f"±{100 * stderr:.2f}" if stderr is not None else "")

    columns = ["evaluation"] + ["perplexity"] * bool(record["perplexity"])
    columns += ["acc %", "acc_norm %", "averaged", "n-shot"] * bool(record["tasks"]) + ["samples"]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "evaluation" else "right", no_wrap=column == "evaluation")
    rows = []
    for p in record["perplexity"]:
        split = "" if p["split"] == "eval" else f" ({p['split']})"
        rows.append({"evaluation": f"{p['data']}{split}", "perplexity": f"{p['perplexity']:.3f}",
                     "samples": f"{p['windows']} windows"})
    for t in record["tasks"]:
        rows.append({"evaluation": t["task"], "acc %": percent(t["acc"], t["acc_stderr"]),
                     "acc_norm %": percent(t["acc_norm"], t["acc_norm_stderr"]), "averaged": t["averaged"] or "-",
                     "n-shot": str(t["n_shot"]), "samples": f"{t['samples']:,}"})
    if record["average"]:
        n = len(record["average"]["tasks"])
        rows.append({"evaluation": f"average ({record['average']['metric']})",
                     "averaged": f"{100 * record['average']['value']:.2f}", "samples": f"{n} task{'s' * (n != 1)}"})
    for row in rows:
        table.add_row(*(row.get(column, "") for column in columns))
    return table


def _eval_notes(record: dict) -> list[str]:
    """The lines printed under the table: protocols, the average's rule, other metrics, warnings."""
    from ..evaluate.harness import PAPER_METRIC

    notes = [f"perplexity protocol ({p['data']}): {p['protocol']}" for p in record["perplexity"]]
    for t in record["tasks"]:
        if t["other"]:
            notes.append(f"{t['task']}: " + ", ".join(f"{k} {v:.4f}" for k, v in t["other"].items()))
    if record["average"]:
        rule = {"paper": "acc_norm for " + ", ".join(k for k, v in PAPER_METRIC.items() if v == "acc_norm")
                         + ", acc for every other task (the LLM-Pruner and LoRAPrune tables)",
                "acc": "acc of every task", "acc_norm": "acc_norm, or acc where a task has none"}
        left_out = record["average"]["left_out"]
        notes.append(f"average: unweighted mean of the 'averaged' column; --average {record['average']['metric']}: "
                     f"{rule[record['average']['metric']]}" + (f"; left out (no accuracy): {', '.join(left_out)}"
                                                               if left_out else ""))
    if record["tasks"] and record["limit"] is not None:
        notes.append(f"[yellow]warning: --limit {record['limit']}: each task scored on at most {record['limit']} "
                     "samples; these numbers are not comparable with published ones[/yellow]")
    return notes


@commands.command(epilog="Example: prunetune info smollm2-135m")
def info(model: str = typer.Argument(..., help=MODEL_HELP)) -> None:
    """Show a model's architecture, prunable units per layer and parameter counts."""
    from ..models import check_model, load_model
    from ..structure.units import Structure, count_parameters

    check_model(model)  # a missing model or unsupported architecture, from the config alone
    loaded, _ = load_model(model, device="cpu")
    s = Structure.of(loaded)
    params = count_parameters(loaded)
    out.print(f"{s.model_type}: {s.num_layers} layers, hidden {s.hidden}, head dim {s.head_dim}, vocab {s.vocab}, "
              f"tied embeddings: {s.tied_embeddings}, positions: {s.max_positions}")
    out.print(f"parameters: {params['total']:,} total, {params['non_embedding']:,} non-embedding, "
              f"{s.prunable_params():,} in attention and MLP projections")
    table = Table()
    for column in ("layers", "query heads", "kv heads", "MLP channels"):
        table.add_column(column, justify="right")
    start = 0
    for i in range(1, s.num_layers + 1):
        if i == s.num_layers or s.layers[i] != s.layers[start]:
            shape = s.layers[start]
            span = f"{start}" if start == i - 1 else f"{start}-{i - 1}"
            table.add_row(span, str(shape.num_heads), str(shape.num_kv_heads), str(shape.intermediate))
            start = i
    out.print(table)


@commands.command(cls=deprecating_command("bench"), epilog="Examples:\n\n"
             "prunetune bench runs/dense runs/mag20 runs/mag50 --prompt-len 2048 --json speed.json\n\n"
             "prunetune bench runs/mag20 --adapter runs/mag20-lora   (a PEFT adapter saved with save_pretrained)\n\n"
             "prunetune bench shape:llama-7b --prompt-len 1024 --decode-tokens 64   "
             "(random weights, nothing downloaded)\n\n"
             "Benchmark script: python benchmarks/speed.py (LLaMA-7B shape: dense, pruned 20% and 50%)")
def bench(
    models: list[str] = typer.Argument(..., help="Models to compare; the first is the reference of every ratio. "
                                       + MODEL_HELP + " Or shape:NAME, a random model of a named shape: "
                                       "llama-7b, llama-13b, llama3-8b, smollm2-135m, tiny."),
    prompt_len: int = typer.Option(2048, help="Prompt length in tokens (random tokens)."),
    decode_tokens: int = typer.Option(128, help="Tokens generated greedily after the prompt (0: prefill only)."),
    batch_size: int = options.batch_size(1, why="Here: sequences per timed run."),
    warmup_runs: int = options.warmup_runs(),
    repeats: int = options.repeats(),
    lora: Optional[Path] = options.adapter("every model it fits is also measured with the adapter unmerged and "
                                           "merged."),
    dtype: str = options.dtype(),
    device: str = options.device(),
    seed: int = options.seed("the random prompt and shape: models' weights"),
    json_path: Optional[Path] = options.json_path("the numbers"),
) -> None:
    """Inference speed and memory side by side: prefill latency, decode tokens/s, peak memory, prefill FLOPs.

    On the CPU each model runs in its own process, which is how its memory is measured.
    """
    if models[0] == "criterion":
        raise UserError("the criterion benchmark moved to `prunetune bench-criterion`; "
                        "`prunetune bench MODEL [MODEL ...]` measures inference speed")
    from ..bench.speed import SpeedSettings, bench_speed
    from ..bench.speed_table import result_notes, result_table
    from ..report import provenance, write_json

    check_json_path(json_path)
    settings = SpeedSettings(models=tuple(models), prompt_len=prompt_len, decode_tokens=decode_tokens,
                             batch_size=batch_size, warmup=warmup_runs, repeats=repeats,
                             lora=str(lora) if lora else None, dtype=dtype, device=device, seed=seed)
    result = bench_speed(settings, log=lambda msg: out.print(f"[dim]{msg}[/dim]"))
    out.print(result_table(result))
    for line in result_notes(result):
        out.print(line)
    if json_path:
        write_json(json_path, provenance("bench", **result.to_dict()))


@commands.command("bench-criterion", cls=deprecating_command("bench-criterion"), epilog="Examples:\n\n"
             "prunetune bench-criterion --shape llama-7b --seq-len 1024 --json criterion-7b.json\n\n"
             "prunetune bench-criterion --shape smollm2-135m --seq-len 256 --gradient-checkpointing")
def bench_criterion_command(
    shape: str = typer.Option("llama-7b", help="Randomly initialised model of a named shape: llama-7b, llama-13b, "
                              "llama3-8b, smollm2-135m, tiny (no weights downloaded)."),
    model: Optional[str] = typer.Option(None, help="Measure this real model instead of --shape. " + MODEL_HELP),
    batch_size: int = options.batch_size(1, why="Here: sequences per scoring step."),
    seq_len: int = options.seq_len(1024, why="Here: random tokens per sequence; 1024, a long-context scoring "
                                   "step, where the criteria's costs differ most."),
    warmup_runs: int = options.warmup_runs("steps"),
    repeats: int = options.repeats("steps"),
    variants: str = typer.Option("taylor,lora-guided,lora-guided-8bit", help="Which variants to run "
                                 "(comma-separated)."),
    dtype: str = options.dtype(),
    device: str = options.device(),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    json_path: Optional[Path] = options.json_path("the numbers"),
) -> None:
    """The cost of one scoring step: vanilla Taylor, LoRA-guided, LoRA-guided on an 8-bit base.

    On the CPU each variant runs in its own process, which is how its memory is measured.
    """
    from ..bench.criterion import BenchSettings, bench_criterion, result_notes, result_table
    from ..report import provenance, write_json

    check_json_path(json_path)
    settings = BenchSettings(shape=shape, model=model, batch_size=batch_size, seq_len=seq_len, warmup=warmup_runs,
                             repeats=repeats, dtype=dtype, device=device, gradient_checkpointing=gradient_checkpointing,
                             variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
    result = bench_criterion(settings, log=lambda msg: out.print(f"[dim]{msg}[/dim]"))
    out.print(result_table(result))
    for line in result_notes(result):
        out.print(line)
    if json_path:
        write_json(json_path, provenance("bench-criterion", **result.to_dict()))


@commands.command("report", epilog="Examples:\n\n"
             "prunetune report runs/lp20                  (redraw one run's report.md and plots)\n\n"
             "prunetune report runs/lp20 runs/taylor20 runs/mag20 --out runs/compare")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (each with a prunetune.json)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the comparison of several runs goes "
                                           "(report.md and comparison.png)."),
    overwrite: bool = options.overwrite(),
) -> None:
    """Redraw a run's report, or compare several runs side by side in one table and one figure."""
    from ..report import compare_runs, read_record, run_directory, write_report
    from ..report.markdown import COMPARE_COLUMNS, PLOTS_DIR, format_summary
    from ..report.rundir import extra_file

    records = [read_record(d) for d in run_dirs]  # every directory is checked before anything is written
    if len(run_dirs) == 1 and out_dir is None:
        path = write_report(run_dirs[0], records[0])
        out.print(f"wrote {path} and its plots in {extra_file(run_dirs[0], PLOTS_DIR)}")
        return
    if out_dir is None:
        raise UserError("comparing several runs needs --out DIR for the report and figure")
    with run_directory(out_dir, overwrite) as tmp:
        summaries, _ = compare_runs(run_dirs, tmp)
    table = Table(title=f"{len(run_dirs)} runs")
    for column, _, _ in COMPARE_COLUMNS:
        table.add_column(column, justify="left" if column in ("run", "method") else "right")
    for summary in summaries:
        table.add_row(*format_summary(summary))
    out.print(table)
    out.print(f"wrote {out_dir / 'report.md'} and {out_dir / 'comparison.png'}")


