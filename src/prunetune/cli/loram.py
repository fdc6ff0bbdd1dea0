"""`prunetune loram prune|align|train|recover|run`: LoRAM's steps, and the whole pipeline in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import DTYPE_HELP, MODEL_HELP, log, out, training_options
from .exporting import ExportOption, check_export_shape, parse_export

commands = typer.Typer(no_args_is_help=True, help="LoRAM: train a LoRA on a pruned (optionally NF4) model, "
                        "recover it to the full model's shapes, serve it on the full model.")


@commands.command("prune", epilog="Example: prunetune loram prune smollm2-135m --ratio 0.5 --method stru --out runs/loram/pruned")
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
    from ..methods.loram.pipeline import LoramPruneSettings, prune_for_loram
    from ..runs.settings import RunOptions

    settings = LoramPruneSettings(method=method, ratio=ratio, criterion=criterion, layers=layers, data=data,
                                  calib_samples=calib_samples, seq_len=seq_len, seed=seed)
    record = prune_for_loram(model, out_dir, settings, RunOptions(dtype=dtype, device=device, overwrite=overwrite),
                             log=log)
    loram = record["loram"]
    out.print(f"{method} pruning of {model}: parameter reduction ratio {loram['reduction_ratio']:.2f}x "
              f"(original parameters / pruned parameters, 16-bit); saved to {out_dir}")


@commands.command("align", epilog="Example: prunetune loram align runs/loram/pruned --data builtin:pydoc --steps 100 --out runs/loram/aligned")
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
    from ..methods.loram.pipeline import StepOptions, align

    training = training_options(steps, batch_size, grad_accum, seq_len, lr, gradient_checkpointing,
                                 checkpoint_every, seed)
    step = StepOptions(data=data, eval_data=[d for d in eval_data.split(",") if d.strip()], eval_seq_len=eval_seq_len,
                       max_windows=max_windows, dtype=dtype, device=device, overwrite=overwrite, resume=resume)
    record = align(pruned, out_dir, training, step, log=log)
    if record:  # under FSDP only the main process has one
        _print_step(record, out_dir)


@commands.command("train", epilog="Example: prunetune loram train runs/loram/aligned --data builtin:stdlib-code --steps 200 --quant nf4 --out runs/loram/adapter")
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
    from ..training.lora import LoraSettings
    from ..methods.loram.pipeline import StepOptions, train_adapter

    training = training_options(steps, batch_size, grad_accum, seq_len, lr, gradient_checkpointing,
                                 checkpoint_every, seed)
    step = StepOptions(data=data, eval_data=[d for d in eval_data.split(",") if d.strip()], eval_seq_len=eval_seq_len,
                       max_windows=max_windows, dtype=dtype, device=device, overwrite=overwrite, resume=resume)
    record = train_adapter(model, out_dir, training, LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout),
                           step, quant=quant, log=log)
    if not record:  # under FSDP only the main process has one
        return
    _print_step(record, out_dir)
    out.print(f"parameter reduction ratio {record['parameters']['reduction_ratio']:.2f}x "
              f"({record['parameters']['original']:,} original / "
              f"{record['parameters']['base'].get('nonzero', record['parameters']['base']['total']):,} trained-on "
              f"parameters x {({None: 16, '8bit': 8, 'nf4': 4})[quant]} bits / 16)")


@commands.command("recover", epilog="Example: prunetune loram recover runs/loram/adapter --pruned runs/loram/aligned "
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
    from ..methods.loram.pipeline import recover

    gguf_outtype = parse_export(export)
    if gguf_outtype and not merge:
        raise UserError("--export gguf needs --merge: without it the output is an adapter, not a model")
    check_export_shape(gguf_outtype, full, per_layer=False)
    record = recover(adapter, pruned, full, out_dir, merge=merge, overwrite=overwrite, dtype=dtype, export=gguf_outtype,
                     log=log)
    what = "the full model with the adapter merged" if merge else "a PEFT adapter for the full model"
    out.print(f"recovered ({record['recovery']}); wrote {what} to {out_dir}")
    if not merge:
        out.print(f"load it with PeftModel.from_pretrained(full_model, '{out_dir}')")


@commands.command("run", epilog="Example: prunetune loram run smollm2-135m --ratio 0.5 --align-data builtin:pydoc "
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
    align_steps: int = typer.Option(100, help="Alignment steps (full-parameter); 0 trains the adapter on the "
                                    "pruned model as it is, which transferred better on SmolLM2 (see the README)."),
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
    from ..methods.loram.run import LoramRunSettings, loram_run

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


