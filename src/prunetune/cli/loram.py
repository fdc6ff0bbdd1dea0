"""`prunetune loram prune|align|train|recover|run`: LoRAM's steps, and the whole pipeline in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..training.rates import ALIGN_LR
from . import options
from .common import log, out
from .exporting import ExportOption, check_export_shape, parse_export
from .flags import warn
from .options import MODEL_HELP

# What LoRAM's defaults rest on, from the README's LoRAM benchmark on SmolLM2-135M.
RATIO_WHY = ("0.5, the README's LoRAM benchmark: on SmolLM2-135M the adapter recovered from 50% kept 63% of a "
             "full-model LoRA's gain after distilled alignment (27% without), from 20% 88% without; the paper's "
             "7-70B models lose less to pruning.")
LAYERS_WHY = "Default: paper for stru and rand (LLM-Pruner's choice), all for semi and unst (as Wanda)."
ALIGN_LR_WHY = ("1e-4: on SmolLM2-135M at 50%, distilled alignment at 1e-4 let the recovered adapter keep 63% of a "
                "full-model LoRA's gain (27% unaligned); next-token alignment (--align-next-token) wants 1e-5 or "
                "less: at 1e-4 it hurt the transfer (10%), at 1e-5 less (docs/methods/loram.md).")
EVAL_DATA_WHY = ("Default: none, no evaluation after the step (`loram run` evaluates the recovered adapter on the "
                 "full model itself).")
CRITERION_HELP = "stru: taylor (default), magnitude or wanda-sp; semi/unst: wanda (default) or magnitude."

commands = typer.Typer(no_args_is_help=True, help="LoRAM: train a LoRA on a pruned (optionally NF4) model, "
                        "recover it to the full model's shapes, serve it on the full model.")


@commands.command("prune", epilog="Example: prunetune loram prune smollm2-135m --ratio 0.5 --method stru "
                                  "--out runs/loram/pruned")
def loram_prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = options.out("Output directory for the pruned model."),
    ratio: float = options.ratio(0.5, "unst: the fraction of each row's weights zeroed instead; semi is 2:4 "
                                 "(0.5). Default " + RATIO_WHY),
    method: str = typer.Option("stru", help="stru (structured, Taylor by default), rand (random units), semi (2:4) "
                               "or unst (unstructured)."),
    criterion: Optional[str] = typer.Option(None, help=CRITERION_HELP),
    layers: Optional[str] = options.layers(why=LAYERS_WHY),
    data: str = typer.Option("builtin:pydoc", help="Calibration data."),
    calib_samples: int = options.calib_samples(),
    seq_len: int = options.seq_len(128, why="128 here: calibration sequences, as LLM-Pruner's."),
    seed: int = options.seed("rand's units"),
    dtype: str = options.dtype(),
    device: str = options.device(),
    overwrite: bool = options.overwrite(),
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


@commands.command("align", epilog="Example: prunetune loram align runs/loram/pruned --data builtin:pydoc --steps 100 "
                                  "--out runs/loram/aligned")
def loram_align(
    pruned: Path = typer.Argument(..., help="A directory from `prunetune loram prune`."),
    out_dir: Path = options.out("Output directory for the aligned pruned model."),
    data: str = typer.Option("builtin:pydoc", help="General corpus for the alignment (its train split)."),
    steps: int = options.steps(),
    batch_size: int = options.batch_size(),
    grad_accum: int = options.grad_accum(),
    seq_len: int = options.seq_len(),
    lr: float = options.lr(ALIGN_LR, ALIGN_LR_WHY),
    warmup: float = options.warmup(),
    distill: Optional[bool] = options.distill("Align by distillation: the pruned model learns the full model's "
                                              "next-token distributions (the full model is loaded a second time; "
                                              "default: on). --no-distill: the paper's continued pre-training."),
    distill_alpha: Optional[float] = options.distill_alpha(1.0),
    distill_temperature: float = options.distill_temperature(),
    teacher_cache: Optional[Path] = options.teacher_cache(), teacher_top_k: int = options.teacher_top_k(),
    eval_data: Optional[str] = options.eval_data(None, EVAL_DATA_WHY),
    eval_seq_len: int = options.eval_seq_len(),
    max_windows: Optional[int] = options.max_windows(),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    checkpoint_every: int = options.checkpoint_every(),
    resume: bool = options.resume(),
    seed: int = options.seed("data order"),
    dtype: str = options.dtype(),
    device: str = options.device(),
    overwrite: bool = options.overwrite(),
) -> None:
    """Full-parameter next-token training of the pruned model, once, before any LoRA training."""
    from ..methods.loram.pipeline import StepOptions, align
    from ..training.loop import TrainSettings

    training = TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                             warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                             checkpoint_every=checkpoint_every, seed=seed)
    step = StepOptions(data=data, eval_data=_eval_specs(eval_data), eval_seq_len=eval_seq_len,
                       max_windows=max_windows, dtype=dtype, device=device, overwrite=overwrite, resume=resume)
    from ..training.distill import DistillSettings

    record = align(pruned, out_dir, training, step, log=log,
                   distill=DistillSettings(enabled=distill, alpha=distill_alpha, temperature=distill_temperature,
                                           cache=str(teacher_cache) if teacher_cache else None, top_k=teacher_top_k))
    if record:  # under FSDP only the main process has one
        _print_step(record, out_dir)


@commands.command("train", epilog="Example: prunetune loram train runs/loram/aligned --data builtin:stdlib-code "
                                  "--steps 200 --quant nf4 --out runs/loram/adapter")
def loram_train(
    model: str = typer.Argument(..., help="The (aligned) pruned model; or any model, e.g. the full one for a "
                                "baseline."),
    out_dir: Path = options.out("Output directory for the PEFT adapter."),
    data: str = typer.Option("builtin:pydoc", help="Training data (instruction data: loss on responses only)."),
    steps: int = options.steps(),
    quant: Optional[str] = options.quant(),
    batch_size: int = options.batch_size(),
    grad_accum: int = options.grad_accum(),
    seq_len: int = options.seq_len(),
    lr: float = options.lr(),
    warmup: float = options.warmup(),
    lora_r: int = options.lora_r(),
    lora_alpha: int = options.lora_alpha(),
    lora_dropout: float = options.lora_dropout(),
    eval_data: Optional[str] = options.eval_data(None, EVAL_DATA_WHY),
    eval_seq_len: int = options.eval_seq_len(),
    max_windows: Optional[int] = options.max_windows(),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    checkpoint_every: int = options.checkpoint_every(),
    resume: bool = options.resume(),
    seed: int = options.seed("data order and the adapter's initialisation"),
    dtype: str = options.dtype(),
    device: str = options.device(),
    overwrite: bool = options.overwrite(),
) -> None:
    """Train a LoRA on the pruned model and save it as a PEFT adapter."""
    from ..training.lora import LoraSettings
    from ..methods.loram.pipeline import StepOptions, train_adapter
    from ..training.loop import TrainSettings

    training = TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                             warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                             checkpoint_every=checkpoint_every, seed=seed)
    step = StepOptions(data=data, eval_data=_eval_specs(eval_data), eval_seq_len=eval_seq_len,
                       max_windows=max_windows, dtype=dtype, device=device, overwrite=overwrite, resume=resume)
    lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    lora.check()  # train_adapter checks it only once the model is loaded
    record = train_adapter(model, out_dir, training, lora, step, quant=quant, log=log)
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
    out_dir: Path = options.out("Output: a PEFT adapter directory for the full model."),
    merge: bool = typer.Option(False, help="Write the full model with the adapter merged instead."),
    dtype: str = options.dtype(why="With --merge: the merged model's."),
    overwrite: bool = options.overwrite(),
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
    out_dir: Path = options.out("Output directory: every step's directory plus the comparison."),
    ratio: float = options.ratio(0.5, "See `prunetune loram prune --help`. Default " + RATIO_WHY),
    method: str = typer.Option("stru", help="stru, rand, semi or unst (see `prunetune loram prune --help`)."),
    criterion: Optional[str] = typer.Option(None, help=CRITERION_HELP),
    layers: Optional[str] = options.layers(why=LAYERS_WHY),
    align_data: str = typer.Option("builtin:pydoc", help="General corpus for alignment (and calibration)."),
    align_steps: int = typer.Option(100, help="Alignment steps (full-parameter), as the paper aligns its 7-70B "
                                    "models; 0 trains the adapter on the pruned model as it is, which transferred "
                                    "better on SmolLM2-135M at every ratio measured (README)."),
    align_lr: float = typer.Option(ALIGN_LR, help="Alignment learning rate; " + ALIGN_LR_WHY),
    align_distill: bool = typer.Option(True, "--align-distill/--align-next-token", help="Align by distillation "
                                       "from the full model (--align-next-token: the paper's continued "
                                       "pre-training)."),
    data: str = typer.Option("builtin:stdlib-code", help="The LoRA's training domain; its held-out split is the "
                             "in-domain evaluation."),
    ood_data: Optional[str] = typer.Option(None, help="Out-of-domain evaluation data (default: the other built-in "
                                           "domain)."),
    steps: int = options.steps(why="The LoRA's (the baseline trains as many)."),
    lr: float = options.lr(),
    batch_size: int = options.batch_size(),
    seq_len: int = options.seq_len(),
    quant: Optional[str] = options.quant("nf4: QLoRAM."),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    baseline: bool = typer.Option(False, help="Also train a LoRA on the full model for the same steps and compare."),
    ablation: bool = typer.Option(False, help="Also train on the unaligned pruned model (the paper's ablation)."),
    eval_seq_len: int = options.eval_seq_len(),
    max_windows: Optional[int] = options.max_windows(),
    seed: int = options.seed("every step's"),
    overwrite: bool = options.overwrite(),
) -> None:
    """LoRAM end to end: prune, align, train, recover; compare on in-domain and out-of-domain text."""
    from ..methods.loram.run import LoramRunSettings, loram_run

    settings = LoramRunSettings(ratio=ratio, method=method, criterion=criterion, layers=layers, align_data=align_data,
                                align_steps=align_steps, align_lr=align_lr, align_distill=align_distill,
                                data=data, ood_data=ood_data, steps=steps,
                                lr=lr, batch_size=batch_size, seq_len=seq_len, quant=quant,
                                gradient_checkpointing=gradient_checkpointing, baseline=baseline, ablation=ablation,
                                eval_seq_len=eval_seq_len, max_windows=max_windows, seed=seed)
    loram_run(model, out_dir, settings, overwrite=overwrite, log=lambda msg: out.print(f"[bold]{msg}[/bold]"))
    out.print((out_dir / "report.md").read_text())


def _eval_specs(eval_data: str | None) -> list[str]:
    """--eval-data takes one data spec, as everywhere; the comma-separated list it took here is read
    for one more release."""
    specs = [d.strip() for d in (eval_data or "").split(",") if d.strip()]
    if len(specs) > 1:
        warn("several --eval-data specs separated by commas are deprecated; give one (`prunetune eval --data A,B` "
             "scores several)")
    return specs


def _print_step(record: dict, out_dir: Path) -> None:
    training = record["training"]
    out.print(f"{record['command']}: {len(training['history'])} steps, "
              f"final loss {training['history'][-1]['loss']:.4f}, "
              f"{training['seconds']:.0f}s, peak memory {training['peak_memory_bytes'] / 2**30:.2f} GiB "
              f"({training['peak_memory_kind']})")
    for p in record["results"]["perplexity"]:
        out.print(f"perplexity {p['data']}: {p['perplexity']:.3f} ({p['protocol']})")
    out.print(f"saved to {out_dir}")


