"""The `prunetune` command: parse, call the API, print. No logic lives here."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from .cli_export import ExportOption, check_export_shape, export_after_run, parse_export
from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make Hugging Face decoder LLMs smaller and cheaper to adapt: structured pruning and LoRA.",
)
# Piped output (CI logs, files) gets 120 columns rather than rich's 80, so the wide tables stay whole.
out = Console(width=120) if not sys.stdout.isatty() and "COLUMNS" not in os.environ else Console()

MODEL_HELP = "Hub id, local model directory, .gguf file, or the built-in 'smollm2-135m'."
DTYPE_HELP = "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."
QUANT_HELP = "Load the frozen base quantized with bitsandbytes: 8bit or nf4."


def _quiet_libraries() -> None:
    # Through the environment, read when transformers and huggingface_hub are first imported: importing
    # them here would cost --help and every argument error seconds.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what transformers' disable_progress_bar() sets
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@app.command(epilog="Examples:\n\n"
             "prunetune prune smollm2-135m --method loraprune --ratio 0.5 --data builtin:pydoc --steps 200 --out runs/lp50\n\n"
             "prunetune prune smollm2-135m --method taylor --ratio 0.2 --recover-steps 100 --out runs/taylor20")
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (written beside, renamed when complete)."),
    method: str = typer.Option("magnitude", help="loraprune (progressive, LoRA-guided), or one-shot: magnitude, "
                               "taylor, wanda-sp, random, lora-guided (LoRAPrune's criterion once, from "
                               "calibration batches)."),
    ratio: float = typer.Option(0.2, help="Fraction of prunable parameters to remove, in (0, 1)."),
    layers: Optional[str] = typer.Option(None, help="Layers to prune: all (stock-loadable result; default for one-shot), "
                                         "paper (all but the first 10% and the last; default for loraprune), or e.g. '3-27'."),
    units: str = typer.Option("heads,channels", help="Unit kinds to prune: heads, channels, or both."),
    head_unit: str = typer.Option("kv-group", help="kv-group (a key/value head with its query heads) or q-head (equal query heads per group)."),
    round_to: Optional[str] = typer.Option(None, show_default=False, help="Keep MLP channel counts a multiple of "
                                           "this (fast GPU shapes): a number (1: no rounding) or auto, the default "
                                           "(128 on MLPs 4096 or more wide, 64 on narrower ones)."),
    allocation: str = typer.Option("uniform", help="uniform (same ratio in every pruned layer) or global (rank units across layers)."),
    split: str = typer.Option("cost", help="How a budget is shared by heads and channels: cost (rank them by "
                              "importance per parameter; a head goes only when it is worth less than the "
                              "channels it spares) or heads-first (every layer loses --ratio of its heads, "
                              "channels fill the rest: the official code and LLM-Pruner)."),
    data: str = typer.Option("builtin:pydoc", help="Training data (loraprune, recovery) and calibration data (taylor, wanda-sp)."),
    steps: int = typer.Option(100, help="loraprune: optimizer steps of LoRA training while pruning."),
    recover_steps: int = typer.Option(0, help="One-shot methods: LoRA fine-tuning steps after pruning (merged before saving)."),
    calib_samples: int = typer.Option(10, help="taylor, wanda-sp: calibration sequences."),
    score: str = typer.Option("abs", help="loraprune: abs (official code) or square (paper)."),
    normalize: str = typer.Option("auto", help="loraprune: module (L2-normalise each module's unit scores: the "
                                  "official code), model (one scale per step for the whole model, which keeps heads "
                                  "and channels comparable), none; auto: model with --split cost, module with heads-first."),
    prune_every: int = typer.Option(10, help="loraprune: steps between mask updates."),
    prune_warmup: float = typer.Option(0.1, help="loraprune: fraction of the steps before pruning starts."),
    prune_cooldown: float = typer.Option(0.1, help="loraprune: fraction of the steps trained at the final shape "
                                         "(the cubic schedule reaches the target at 1 - this)."),
    distill: Optional[bool] = typer.Option(None, "--distill/--no-distill", show_default=False,
                                           help="Train against the unpruned model's next-token distributions "
                                           "(KL divergence). loraprune: on by default, the teacher is the model "
                                           "itself with its masks off, no second copy (--no-distill: the paper's "
                                           "exact recipe); --recover-steps: off by default, the teacher is the "
                                           "source model, loaded a second time."),
    teacher: str = typer.Option("base", help="--distill with loraprune: base (adapters off: the pretrained model) "
                                "or tuned (adapters on: the unpruned model as it fine-tunes)."),
    distill_temperature: float = typer.Option(1.0, help="--distill: softmax temperature of both sides."),
    distill_alpha: float = typer.Option(1.0, help="--distill: weight of the distillation term; the language-model "
                                        "loss gets 1 - this."),
    ema: float = typer.Option(0.9, help="loraprune: weight of the old moving-average score."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha."),
    lora_dropout: float = typer.Option(0.05, help="LoRA dropout."),
    lora_dtype: str = typer.Option("float32", help="LoRA weights in float32 (PEFT's default) or base (the model's "
                                   "dtype, e.g. bf16: no casts, faster on a GPU)."),
    batch_size: int = typer.Option(4, help="Sequences per micro-batch (per process)."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(256, help="Training and calibration sequence length."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (AdamW, cosine schedule)."),
    warmup: float = typer.Option(0.05, help="Learning-rate warm-up, as a fraction of the steps."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping (0: off)."),
    gradient_checkpointing: bool = typer.Option(False, help="Trade compute for activation memory."),
    checkpoint_every: int = typer.Option(0, help="Save a resumable checkpoint every N steps (0: never)."),
    resume: bool = typer.Option(False, help="Continue a killed run from its last checkpoint (same command)."),
    seed: int = typer.Option(0, help="Seed for data order, LoRA init and the random criterion."),
    eval_data: str = typer.Option("builtin:pydoc", help="Data for perplexity before and after; see `prunetune eval --help`."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the perplexity evaluation."),
    eval_seq_len: int = typer.Option(256, help="Perplexity window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    quant: Optional[str] = typer.Option(None, help=QUANT_HELP),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    export: ExportOption = None,
) -> None:
    """Prune a model to a ratio of its prunable parameters and save the smaller model."""
    gguf_outtype = parse_export(export)
    from .distill import DistillSettings
    from .lora import LoraSettings
    from .methods.loraprune import LoRAPruneSettings
    from .methods.prune import EvalSettings, PruneSettings, RunOptions
    from .methods.prune import prune as run_prune
    from .structure.allocate import DEFAULT_ROUND_TO, parse_round_to
    from .train import TrainSettings

    settings = PruneSettings(method=method, ratio=ratio, layers=layers, units=units, head_unit=head_unit,
                             round_to=parse_round_to(round_to or DEFAULT_ROUND_TO), allocation=allocation,
                             split=split, data=data, calib_samples=calib_samples, recover_steps=recover_steps,
                             seed=seed)
    evaluation = EvalSettings(data=None if no_eval else eval_data, seq_len=eval_seq_len, max_windows=max_windows)
    options = RunOptions(
        training=TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                               warmup=warmup, max_grad_norm=max_grad_norm, gradient_checkpointing=gradient_checkpointing,
                               checkpoint_every=checkpoint_every, seed=seed),
        lora=LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, dtype=lora_dtype),
        loraprune=LoRAPruneSettings(prune_every=prune_every, ema=ema, score=score, normalize=normalize,
                                    warmup=prune_warmup, cooldown=prune_cooldown),
        distill=DistillSettings(enabled=distill, temperature=distill_temperature, alpha=distill_alpha, teacher=teacher),
        dtype=dtype, device=device, quant=quant, overwrite=overwrite, resume=resume,
    )
    check_export_shape(gguf_outtype, model, per_layer=(layers or ("paper" if method == "loraprune" else "all")) != "all")
    record = run_prune(model, out_dir, settings, evaluation, options, log=_log)
    if record.get("architecture"):  # only the main process of a multi-GPU run prints
        _print_prune_summary(record, out_dir)
        export_after_run(out_dir, gguf_outtype, _log)


def _print_prune_summary(record: dict, out_dir: Path) -> None:
    params, results = record["parameters"], record["results"]
    table = Table(title=f"{record['method']} pruning of {record['source_model']}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key, label in (("total", "parameters (total)"), ("non_embedding", "parameters (non-embedding)"),
                       ("prunable", "prunable parameters")):
        b, a = params["before"][key], params["after"][key]
        table.add_row(label, f"{b:,}", f"{a:,}", f"{(a - b) / b:+.1%}")
    if "perplexity_before" in results:
        b, a = results["perplexity_before"], results["perplexity_after"]
        table.add_row(f"perplexity ({b['data']})", f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}",
                      f"{(a['perplexity'] - b['perplexity']) / b['perplexity']:+.1%}")
    out.print(table)
    out.print(f"ratio of prunable parameters removed: target {params['ratio_target']:.3f}, achieved {params['ratio_achieved']:.3f}")
    out.print(f"prunable parameters: {record['prunable']}")
    if "perplexity_before" in results:
        out.print(f"perplexity protocol: {results['perplexity_before']['protocol']}")
    arch = record["architecture"]
    loader = ("AutoModelForCausalLM.from_pretrained, vLLM" if arch["stock_loadable"] else
              "prunetune.load_model, or vLLM with prunetune installed beside it")
    out.print(f"saved to {out_dir} as {arch['saved_as']} (load with {loader}); took {record['elapsed_seconds']:.0f}s")


@app.command("eval", epilog="Examples:\n\n"
             "prunetune eval runs/mag20 --data wikitext2,ptb --seq-len 128 --json ppl.json\n\n"
             "prunetune eval runs/mag20 --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,boolq\n\n"
             "prunetune eval runs/mag20 --tasks mmlu --num-fewshot 5 --lora runs/mag20-adapter\n\n"
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
    lora: Optional[Path] = typer.Option(None, help="A PEFT adapter directory to evaluate on top of the model, "
                                        "unmerged."),
    seq_len: int = typer.Option(256, help="Perplexity window length in tokens (128 for LLM-Pruner tables, "
                                "2048 for most others)."),
    batch_size: int = typer.Option(1, help="Perplexity windows, or task requests, per forward pass."),
    max_windows: Optional[int] = typer.Option(None, help="Perplexity: evaluate at most this many windows."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every result to this JSON file."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    quant: Optional[str] = typer.Option(None, help=QUANT_HELP),
) -> None:
    """Perplexity over non-overlapping windows and zero-/few-shot tasks (lm-evaluation-harness)."""
    import time

    from .data import eval_command_spec, load_examples
    from .evaluate.adapter import adapter_mismatch, adapter_modules, check_adapter_dir, load_adapter
    from .evaluate.harness import AVERAGES, evaluate_model, parse_list, task_manager
    from .models import check_load_options, check_model, load_model, resolve_model_spec
    from .structure.units import count_parameters

    task_list = parse_list(tasks)
    # A file given here is the user's test set, scored whole unless a split is named.
    data_list = [eval_command_spec(d) for d in parse_list(data) or ([] if task_list else ["builtin:pydoc"])]
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {max_windows}")
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
    _check_json_path(json_path)
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
    from .report import add_evaluation, is_run_directory, provenance, write_json  # matplotlib: not for mistakes

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
    from .evaluate.harness import PAPER_METRIC

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


@app.command(epilog="Example: prunetune info smollm2-135m")
def info(model: str = typer.Argument(..., help=MODEL_HELP)) -> None:
    """Show a model's architecture, prunable units per layer and parameter counts."""
    from .models import check_model, load_model
    from .structure.units import Structure, count_parameters

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


def _check_json_path(json_path: Optional[Path]) -> None:
    if json_path and not json_path.parent.is_dir():
        raise UserError(f"cannot write --json {json_path}: no directory '{json_path.parent}'")


@app.command(epilog="Examples:\n\n"
             "prunetune bench runs/dense runs/mag20 runs/mag50 --prompt-len 2048 --json speed.json\n\n"
             "prunetune bench runs/mag20 --lora runs/mag20-lora   (a PEFT adapter saved with save_pretrained)\n\n"
             "prunetune bench shape:llama-7b --prompt-len 1024 --decode-tokens 64   (random weights, nothing downloaded)\n\n"
             "Benchmark script: python benchmarks/speed.py (LLaMA-7B shape: dense, pruned 20% and 50%)")
def bench(
    models: list[str] = typer.Argument(..., help="Models to compare; the first is the reference of every ratio. "
                                       + MODEL_HELP + " Or shape:NAME, a random model of a named shape: "
                                       "llama-7b, llama-13b, llama3-8b, smollm2-135m, tiny."),
    prompt_len: int = typer.Option(2048, help="Prompt length in tokens (random tokens)."),
    decode_tokens: int = typer.Option(128, help="Tokens generated greedily after the prompt (0: prefill only)."),
    batch_size: int = typer.Option(1, help="Sequences per run."),
    warmup: int = typer.Option(2, help="Untimed runs before timing."),
    repeats: int = typer.Option(5, help="Timed runs; medians are reported."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A PEFT adapter directory: every model it fits is "
                                        "also measured with the adapter unmerged and merged."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, help="Seed of the random prompt and of shape: models' weights."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
) -> None:
    """Inference speed and memory side by side: prefill latency, decode tokens/s, peak memory, prefill FLOPs.

    On the CPU each model runs in its own process, which is how its memory is measured.
    """
    if models[0] == "criterion":
        raise UserError("the criterion benchmark moved to `prunetune bench-criterion`; "
                        "`prunetune bench MODEL [MODEL ...]` measures inference speed")
    from .evaluate.speed import SpeedSettings, bench_speed
    from .evaluate.speed_table import result_notes, result_table
    from .report import provenance, write_json

    _check_json_path(json_path)
    settings = SpeedSettings(models=tuple(models), prompt_len=prompt_len, decode_tokens=decode_tokens,
                             batch_size=batch_size, warmup=warmup, repeats=repeats,
                             lora=str(lora) if lora else None, dtype=dtype, device=device, seed=seed)
    result = bench_speed(settings, log=lambda msg: out.print(f"[dim]{msg}[/dim]"))
    out.print(result_table(result))
    for line in result_notes(result):
        out.print(line)
    if json_path:
        write_json(json_path, provenance("bench", **result.to_dict()))


@app.command("bench-criterion", epilog="Examples:\n\n"
             "prunetune bench-criterion --shape llama-7b --seq-len 1024 --json criterion-7b.json\n\n"
             "prunetune bench-criterion --shape smollm2-135m --seq-len 256 --gradient-checkpointing")
def bench_criterion_command(
    shape: str = typer.Option("llama-7b", help="Randomly initialised model of a named shape: llama-7b, llama-13b, "
                              "llama3-8b, smollm2-135m, tiny (no weights downloaded)."),
    model: Optional[str] = typer.Option(None, help="Measure this real model instead of --shape. " + MODEL_HELP),
    batch_size: int = typer.Option(1, help="Sequences per step."),
    seq_len: int = typer.Option(1024, help="Tokens per sequence (random tokens)."),
    warmup: int = typer.Option(2, help="Untimed steps before timing."),
    repeats: int = typer.Option(5, help="Timed steps; the median is reported."),
    variants: str = typer.Option("taylor,lora-guided,lora-guided-8bit", help="Which variants to run (comma-separated)."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    gradient_checkpointing: bool = typer.Option(False, help="Enable gradient checkpointing for every variant."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
) -> None:
    """The cost of one scoring step: vanilla Taylor, LoRA-guided, LoRA-guided on an 8-bit base.

    On the CPU each variant runs in its own process, which is how its memory is measured.
    """
    from .evaluate.bench_criterion import BenchSettings, bench_criterion, result_notes, result_table
    from .report import provenance, write_json

    _check_json_path(json_path)
    settings = BenchSettings(shape=shape, model=model, batch_size=batch_size, seq_len=seq_len, warmup=warmup,
                             repeats=repeats, dtype=dtype, device=device, gradient_checkpointing=gradient_checkpointing,
                             variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
    result = bench_criterion(settings, log=lambda msg: out.print(f"[dim]{msg}[/dim]"))
    out.print(result_table(result))
    for line in result_notes(result):
        out.print(line)
    if json_path:
        write_json(json_path, provenance("bench-criterion", **result.to_dict()))


@app.command("masks-agree", epilog="Examples:\n\n"
             "prunetune masks-agree smollm2-135m --ratios 0.1,0.2,0.3,0.5 --json agree.json\n\n"
             "prunetune masks-agree smollm2-135m --steps 100 --batches 16 --layers paper")
def masks_agree_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ratios: str = typer.Option("0.1,0.2,0.3,0.5", help="Pruning ratios to compare at, comma-separated, each in (0, 1)."),
    batches: int = typer.Option(8, help="Calibration batches; both criteria see the same ones."),
    batch_size: int = typer.Option(1, help="Sequences per batch."),
    seq_len: int = typer.Option(128, help="Tokens per sequence."),
    data: str = typer.Option("builtin:pydoc", help="Calibration (and LoRA training) data; its train split."),
    layers: str = typer.Option("all", help="Layers to prune: all, paper, or e.g. '3-27'."),
    units: str = typer.Option("heads,channels", help="Unit kinds: heads, channels, or both."),
    head_unit: str = typer.Option("kv-group", help="kv-group or q-head."),
    round_to: int = typer.Option(1, help="Round MLP channel counts to a multiple of this (1: no rounding)."),
    steps: int = typer.Option(0, help="Train the LoRA this many steps first (0: an untrained LoRA with a random B)."),
    lr: float = typer.Option(2e-4, help="Learning rate of the LoRA training (--steps)."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha."),
    score: str = typer.Option("abs", help="LoRA-guided score: abs (official code) or square (paper)."),
    normalize: bool = typer.Option(True, help="LoRA-guided: L2-normalise each module's unit scores (official code)."),
    seed: int = typer.Option(0, help="Seed of the LoRA init and training."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result to this JSON file."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Overlap of the units the LoRA-guided criterion and vanilla Taylor keep, from the same batches."""
    from .methods.masks_agree import AgreeSettings, agreement_table, masks_agree, parse_ratios
    from .report import write_json

    settings = AgreeSettings(ratios=parse_ratios(ratios), batches=batches, batch_size=batch_size, seq_len=seq_len,
                             data=data, layers=layers, units=units, head_unit=head_unit, round_to=round_to,
                             steps=steps, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, score=score,
                             normalize=normalize, seed=seed)
    settings.check()
    _check_json_path(json_path)
    record = masks_agree(model, settings, dtype=dtype, device=device, log=lambda msg: out.print(f"[dim]{msg}[/dim]"))
    out.print(agreement_table(record))
    out.print(f"LoRA: {record['lora']}; gradients: {record['criteria']['gradients']}")
    out.print("overlap = shared units / units kept (or pruned) by taylor; random = expected overlap of random "
              f"choices with the same per-layer counts; took {record['elapsed_seconds']:.0f}s")
    if json_path:
        write_json(json_path, record)


loram_app = typer.Typer(no_args_is_help=True, help="LoRAM: train a LoRA on a pruned (optionally NF4) model, "
                        "recover it to the full model's shapes, serve it on the full model.")
app.add_typer(loram_app, name="loram")


def _log(msg: str) -> None:
    out.print(f"[dim]{msg}[/dim]")


def _training_options(steps: int, batch_size: int, grad_accum: int, seq_len: int, lr: float,
                      gradient_checkpointing: bool, checkpoint_every: int, seed: int):
    from .train import TrainSettings

    return TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                         gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every, seed=seed)


@loram_app.command("prune", epilog="Example: prunetune loram prune smollm2-135m --ratio 0.5 --method stru --out runs/loram/pruned")
def loram_prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Output directory for the pruned model."),
    ratio: float = typer.Option(0.5, help="stru/rand: fraction of the prunable parameters removed; unst: fraction "
                                "of each row's weights zeroed; semi is 2:4 (0.5)."),
    method: str = typer.Option("stru", help="stru (structured, Taylor by default), rand (random units), semi (2:4) "
                               "or unst (unstructured)."),
    criterion: Optional[str] = typer.Option(None, help="stru: taylor (default), magnitude, wanda-sp; "
                                            "semi/unst: wanda (default) or magnitude."),
    layers: Optional[str] = typer.Option(None, help="Layers to prune: paper (all but the first 10% and the last; "
                                         "default for stru/rand), all (default for semi/unst), or e.g. '3-27'."),
    data: str = typer.Option("builtin:pydoc", help="Calibration data."),
    calib_samples: int = typer.Option(10, help="Calibration sequences."),
    seq_len: int = typer.Option(128, help="Calibration sequence length."),
    seed: int = typer.Option(0, help="Seed (rand)."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Prune the model LoRAM will train on and print its parameter reduction ratio."""
    from .methods.loram import LoramPruneSettings, prune_for_loram
    from .methods.prune import RunOptions

    settings = LoramPruneSettings(method=method, ratio=ratio, criterion=criterion, layers=layers, data=data,
                                  calib_samples=calib_samples, seq_len=seq_len, seed=seed)
    record = prune_for_loram(model, out_dir, settings, RunOptions(dtype=dtype, device=device, overwrite=overwrite),
                             log=_log)
    loram = record["loram"]
    out.print(f"{method} pruning of {model}: parameter reduction ratio {loram['reduction_ratio']:.2f}x "
              f"(original parameters / pruned parameters, 16-bit); saved to {out_dir}")


@loram_app.command("align", epilog="Example: prunetune loram align runs/loram/pruned --data builtin:pydoc --steps 100 --out runs/loram/aligned")
def loram_align(
    pruned: Path = typer.Argument(..., help="A directory from `prunetune loram prune`."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory for the aligned pruned model."),
    data: str = typer.Option("builtin:pydoc", help="General corpus for the alignment (its train split)."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per step."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    lr: float = typer.Option(2e-5, help="Peak learning rate (full-parameter training wants a small one)."),
    eval_data: str = typer.Option("", help="Comma-separated held-out perplexity data after aligning (none: skip)."),
    eval_seq_len: int = typer.Option(256, help="Perplexity window length."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows per data set."),
    gradient_checkpointing: bool = typer.Option(False, help="Trade compute for activation memory."),
    checkpoint_every: int = typer.Option(0, help="Resumable checkpoint every N steps (0: never)."),
    resume: bool = typer.Option(False, help="Continue a killed run (same command)."),
    seed: int = typer.Option(0, help="Seed of the data order."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Full-parameter next-token training of the pruned model, once, before any LoRA training."""
    from .methods.loram import StepOptions, align

    training = _training_options(steps, batch_size, grad_accum, seq_len, lr, gradient_checkpointing,
                                 checkpoint_every, seed)
    step = StepOptions(data=data, eval_data=[d for d in eval_data.split(",") if d.strip()], eval_seq_len=eval_seq_len,
                       max_windows=max_windows, dtype=dtype, device=device, overwrite=overwrite, resume=resume)
    record = align(pruned, out_dir, training, step, log=_log)
    _print_step(record, out_dir)


@loram_app.command("train", epilog="Example: prunetune loram train runs/loram/aligned --data builtin:stdlib-code --steps 200 --quant nf4 --out runs/loram/adapter")
def loram_train(
    model: str = typer.Argument(..., help="The (aligned) pruned model; or any model, e.g. the full one for a baseline."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory for the PEFT adapter."),
    data: str = typer.Option("builtin:pydoc", help="Training data (instruction data: loss on responses only)."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    quant: Optional[str] = typer.Option(None, help="nf4 (QLoRAM: NF4 with double quantization) or 8bit."),
    batch_size: int = typer.Option(4, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per step."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    lr: float = typer.Option(2e-4, help="Peak learning rate."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha."),
    lora_dropout: float = typer.Option(0.05, help="LoRA dropout."),
    eval_data: str = typer.Option("", help="Comma-separated held-out perplexity data after training (none: skip)."),
    eval_seq_len: int = typer.Option(256, help="Perplexity window length."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows per data set."),
    gradient_checkpointing: bool = typer.Option(False, help="Trade compute for activation memory."),
    checkpoint_every: int = typer.Option(0, help="Resumable checkpoint every N steps (0: never)."),
    resume: bool = typer.Option(False, help="Continue a killed run (same command)."),
    seed: int = typer.Option(0, help="Seed of the data order and the adapter's initialisation."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Train a LoRA on the pruned model and save it as a PEFT adapter."""
    from .lora import LoraSettings
    from .methods.loram import StepOptions, train_adapter

    training = _training_options(steps, batch_size, grad_accum, seq_len, lr, gradient_checkpointing,
                                 checkpoint_every, seed)
    step = StepOptions(data=data, eval_data=[d for d in eval_data.split(",") if d.strip()], eval_seq_len=eval_seq_len,
                       max_windows=max_windows, dtype=dtype, device=device, overwrite=overwrite, resume=resume)
    record = train_adapter(model, out_dir, training, LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout),
                           step, quant=quant, log=_log)
    _print_step(record, out_dir)
    out.print(f"parameter reduction ratio {record['parameters']['reduction_ratio']:.2f}x "
              f"({record['parameters']['original']:,} original / "
              f"{record['parameters']['base'].get('nonzero', record['parameters']['base']['total']):,} trained-on "
              f"parameters x {({None: 16, '8bit': 8, 'nf4': 4})[quant]} bits / 16)")


@loram_app.command("recover", epilog="Example: prunetune loram recover runs/loram/adapter --pruned runs/loram/aligned "
                   "--full smollm2-135m --out runs/loram/full-adapter")
def loram_recover(
    adapter: Path = typer.Argument(..., help="The adapter from `prunetune loram train`."),
    pruned: Path = typer.Option(..., help="The pruned (or aligned) model it was trained on."),
    full: str = typer.Option(..., help="The full model. " + MODEL_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Output: a PEFT adapter directory for the full model."),
    merge: bool = typer.Option(False, help="Write the full model with the adapter merged instead."),
    dtype: str = typer.Option("auto", help="--merge: " + DTYPE_HELP),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    export: ExportOption = None,
) -> None:
    """Put the adapter trained on the pruned model back at the full model's shapes."""
    from .methods.loram import recover

    gguf_outtype = parse_export(export)
    if gguf_outtype and not merge:
        raise UserError("--export gguf needs --merge: without it the output is an adapter, not a model")
    check_export_shape(gguf_outtype, full, per_layer=False)
    record = recover(adapter, pruned, full, out_dir, merge=merge, overwrite=overwrite, dtype=dtype, log=_log)
    export_after_run(out_dir, gguf_outtype, _log)
    what = "the full model with the adapter merged" if merge else "a PEFT adapter for the full model"
    out.print(f"recovered ({record['recovery']}); wrote {what} to {out_dir}")
    if not merge:
        out.print(f"load it with PeftModel.from_pretrained(full_model, '{out_dir}')")


@loram_app.command("run", epilog="Example: prunetune loram run smollm2-135m --ratio 0.5 --align-data builtin:pydoc "
                   "--data builtin:stdlib-code --steps 100 --baseline --ablation --out runs/loram50")
def loram_run_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Output directory: every step's directory plus the comparison."),
    ratio: float = typer.Option(0.5, help="Pruning ratio (see `prunetune loram prune --help`)."),
    method: str = typer.Option("stru", help="stru, rand, semi or unst."),
    criterion: Optional[str] = typer.Option(None, help="stru: taylor (default), magnitude, wanda-sp; semi/unst: wanda."),
    layers: Optional[str] = typer.Option(None, help="Layers to prune: paper (default for stru/rand), all (default "
                                         "for semi/unst), or e.g. '3-27'."),
    align_data: str = typer.Option("builtin:pydoc", help="General corpus for alignment (and calibration)."),
    align_steps: int = typer.Option(100, help="Alignment steps (full-parameter)."),
    align_lr: float = typer.Option(2e-5, help="Alignment learning rate."),
    data: str = typer.Option("builtin:stdlib-code", help="The LoRA's training domain; its held-out split is the "
                             "in-domain evaluation."),
    ood_data: Optional[str] = typer.Option(None, help="Out-of-domain evaluation data (default: the other built-in domain)."),
    steps: int = typer.Option(100, help="LoRA training steps (the baseline trains as many)."),
    lr: float = typer.Option(2e-4, help="LoRA learning rate."),
    batch_size: int = typer.Option(4, help="Sequences per step."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    quant: Optional[str] = typer.Option(None, help="nf4 for QLoRAM."),
    gradient_checkpointing: bool = typer.Option(False, help="Trade compute for activation memory in every training."),
    baseline: bool = typer.Option(False, help="Also train a LoRA on the full model for the same steps and compare."),
    ablation: bool = typer.Option(False, help="Also train on the unaligned pruned model (the paper's ablation)."),
    eval_seq_len: int = typer.Option(256, help="Perplexity window length."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows per data set."),
    seed: int = typer.Option(0, help="Seed."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """LoRAM end to end: prune, align, train, recover; compare on in-domain and out-of-domain text."""
    from .methods.loram_run import LoramRunSettings, loram_run

    settings = LoramRunSettings(ratio=ratio, method=method, criterion=criterion, layers=layers, align_data=align_data,
                                align_steps=align_steps, align_lr=align_lr, data=data, ood_data=ood_data, steps=steps,
                                lr=lr, batch_size=batch_size, seq_len=seq_len, quant=quant,
                                gradient_checkpointing=gradient_checkpointing, baseline=baseline, ablation=ablation,
                                eval_seq_len=eval_seq_len, max_windows=max_windows, seed=seed)
    loram_run(model, out_dir, settings, overwrite=overwrite, log=lambda msg: out.print(f"[bold]{msg}[/bold]"))
    out.print((out_dir / "report.md").read_text())


def _print_step(record: dict, out_dir: Path) -> None:
    training = record["training"]
    out.print(f"{record['command']}: {len(training['history'])} steps, final loss {training['history'][-1]['loss']:.4f}, "
              f"{training['seconds']:.0f}s, peak memory {training['peak_memory_bytes'] / 2**30:.2f} GiB "
              f"({training['peak_memory_kind']})")
    for p in record["results"]["perplexity"]:
        out.print(f"perplexity {p['data']}: {p['perplexity']:.3f} ({p['protocol']})")
    out.print(f"saved to {out_dir}")


from .cli_export import register as _register_export  # noqa: E402 (after `app` and `out` exist)
from .cli_sheared import register as _register_sheared  # noqa: E402

_register_sheared(app, out)
_register_export(app, out)


@app.command("report", epilog="Examples:\n\n"
             "prunetune report runs/lp20                  (redraw one run's report.md and plots)\n\n"
             "prunetune report runs/lp20 runs/taylor20 runs/mag20 --out runs/compare")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (each with a prunetune.json)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the comparison of several runs goes "
                                           "(report.md and comparison.png)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Redraw a run's report, or compare several runs side by side in one table and one figure."""
    from .report import compare_runs, read_record, run_directory, write_report
    from .report.markdown import COMPARE_COLUMNS, format_summary

    records = [read_record(d) for d in run_dirs]  # every directory is checked before anything is written
    if len(run_dirs) == 1 and out_dir is None:
        path = write_report(run_dirs[0], records[0])
        out.print(f"wrote {path} and its plots in {run_dirs[0] / 'plots'}")
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


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and abort classes of click and of the copy of click that newer typer vendors."""
    usage, abort = [click.ClickException], [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        usage.append(vendored.ClickException)
        if hasattr(vendored, "Abort"):
            abort.append(vendored.Abort)
    return tuple(usage), tuple(abort)


def main() -> None:
    """Entry point: user mistakes become one `error:` line and exit code 2; bugs keep tracebacks."""
    _quiet_libraries()
    usage_errors, aborts = _click_exception_types()
    try:
        result = app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except aborts:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except usage_errors as exc:
        if getattr(exc, "exit_code", 2) == 0:  # `prunetune` alone prints help by raising a 0-code error
            sys.exit(0)
        print(f"error: {exc.format_message()} (see --help)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
