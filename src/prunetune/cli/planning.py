"""`prunetune plan`: will it fit? A method's peak training memory from the model's config alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import options
from .common import out

commands = typer.Typer()

PARTS = (("frozen_weights", "frozen weights (unquantized)"),
         ("quant_state", "quantized projections (packed, with their constants)"),
         ("trainable_weights", "trained weights (LoRA, or all)"), ("gradients", "gradients"),
         ("optimizer", "optimizer state (AdamW)"), ("activations", "activations kept for the backward"),
         ("loss_chunk", "loss chunk (one chunk's fp32 logits)"), ("criterion", "criterion temporaries"))


@commands.command("plan", epilog="Example: prunetune plan shape:llama3.1-70b --method qloram --ratio 0.85 "
                                 "--batch-size 1 --seq-len 512 --gradient-checkpointing --gpu-memory 20GiB")
def plan_command(
    model: str = typer.Argument(..., help="A hub id, a local model directory, a built-in model, or shape:NAME "
                                          "(llama2-7b, llama2-13b, llama2-70b, llama3.1-8b, llama3.1-70b, "
                                          "qwen2.5-7b, llama-7b, llama-65b, smollm2-135m, ...)."),
    method: str = typer.Option("lora", help="lora, loraprune, taylor, loram, qloram, shear or train (a mixture "
                               "of experts: lora, loraprune, taylor or train)."),
    ratio: float = options.ratio(0.5, "loram/qloram: the pruned model's structured ratio (as `loram prune`'s "
                                 "default); taylor: its recovery's."),
    layers: Optional[str] = options.layers(why="loram/qloram/taylor's. Default: as those commands prune, paper "
                                           "for loram/qloram, all for taylor."),
    quant: Optional[str] = options.quant("qloram is nf4."),
    batch_size: int = options.batch_size(),
    seq_len: int = options.seq_len(),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    processes: int = typer.Option(1, help="Processes (GPUs); with more than one, DDP unless --fsdp."),
    fsdp: bool = typer.Option(False, help="FSDP: weights, gradients and optimizer state sharded across the processes."),
    gpu_memory: Optional[str] = typer.Option(None, help="A GPU's memory, e.g. 24GiB or 80GB: say which "
                                                        "configurations fit."),
    dtype: str = options.dtype("bfloat16", why="bfloat16 here: what a GPU run's --dtype auto loads."),
    lora_r: int = options.lora_r(),
    lora_dtype: str = options.lora_dtype(),
    distill: Optional[bool] = options.distill("Self-distillation (default: on for loraprune, as prune runs it)."),
    json_path: Optional[Path] = options.json_path("the plan (bytes)"),
) -> None:
    """Predict the peak training memory per process, with no weights loaded: the method's own steps run
    on the meta device, every tensor counted."""
    from dataclasses import replace

    from ..plan import PlanSettings, parse_memory, plan_method, resolve_config
    from ..structure.allocate import parse_layers

    settings = PlanSettings(method=method, ratio=ratio, quant=quant, batch_size=batch_size, seq_len=seq_len,
                            gradient_checkpointing=gradient_checkpointing, processes=processes, fsdp=fsdp,
                            dtype=dtype, lora_r=lora_r, lora_dtype=lora_dtype, distill=distill, layers=layers)
    settings.check()
    config = resolve_config(model)
    parse_layers(settings.layer_spec, int(config.num_hidden_layers), "PlanSettings.layers")  # before planning
    budget = parse_memory(gpu_memory) if gpu_memory is not None else None
    result = plan_method(config, settings)
    _print_plan(model, result)
    if budget is not None:
        grid = []
        for checkpointing in (False, True):
            for batch in sorted({1, batch_size}):
                variant = replace(settings, gradient_checkpointing=checkpointing, batch_size=batch)
                peak = result["peak"] if variant == settings else plan_method(config, variant)["peak"]
                grid.append({"batch_size": batch, "gradient_checkpointing": checkpointing, "peak": peak,
                             "fits": peak <= budget})
        _print_fits(grid, budget, gpu_memory)
        result["fits"] = {"gpu_memory_bytes": budget, "configurations": grid}
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
        out.print(f"wrote {json_path}")


def _gib(value: int) -> str:
    return f"{value / 2**30:,.2f}"


def _print_plan(model: str, result: dict) -> None:
    from rich.table import Table

    s = result["settings"]
    steps = result["steps"]
    table = Table(title=f"{result['method']} on {model} ({result['parameters']:,} parameters): GiB per process")
    table.add_column("")
    for name in steps:
        table.add_column(name, justify="right")
    for key, label in PARTS:
        if any(step[key] for step in steps.values()):
            table.add_row(label, *(_gib(step[key]) for step in steps.values()))
    table.add_row("[bold]peak, one process[/bold]", *(f"[bold]{_gib(step['peak'])}[/bold]" for step in steps.values()))
    if s["processes"] > 1:
        table.add_row(f"[bold]peak per process, {result['per_process'][result['peak_step']]['mode']}[/bold]",
                      *(f"[bold]{_gib(result['per_process'][n]['peak'])}[/bold]" for n in steps))
    out.print(table)
    quant = {"qloram": "nf4"}.get(result["method"], s["quant"])
    out.print(f"batch {s['batch_size']} x {s['seq_len']} per process, {s['dtype']} weights"
              + (f" ({quant} projections)" if quant else "") + f", LoRA r={s['lora_r']} in {s['lora_dtype']}, "
              f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
              + (f", pruned at {s['ratio']}" if result["method"] in ("loram", "qloram", "taylor") else ""))
    out.print("The parts are what each holds at its own largest; the peak is where they meet (activations "
              "give way to gradients during the backward). A GPU adds its runtime (CUDA context, ~0.5 GiB) "
              "outside these figures.")
    for step in steps.values():
        for note in step["notes"]:
            out.print(f"note: {note}")


def _print_fits(grid: list[dict], budget: int, label: str) -> None:
    from rich.table import Table

    table = Table(title=f"Which configurations fit in {label} ({_gib(budget)} GiB)?")
    for column in ("batch", "checkpointing", "peak GiB", "fits"):
        table.add_column(column)
    for row in grid:
        table.add_row(str(row["batch_size"]), "on" if row["gradient_checkpointing"] else "off", _gib(row["peak"]),
                      "[green]yes[/green]" if row["fits"] else "[red]no[/red]")
    out.print(table)
