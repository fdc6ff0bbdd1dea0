"""`prunetune shear` and `prunetune train`: Sheared-LLaMA's two stages on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from . import options
from .common import log, out
from .exporting import ExportOption, check_export_shape, parse_export
from ..training.rates import FULL_LR
from .options import MODEL_HELP

commands = typer.Typer()

SHEARED_LR_WHY = ("1e-4: the official Sheared-LLaMA code's for training every weight, and the README's runs'; "
                  "LoRA training (prune, loram train) starts from 5e-4.")


def _options(*, steps, batch_size, grad_accum, seq_len, lr, warmup, gradient_checkpointing, checkpoint_every, seed,
             lora_r, lora_alpha, lora_dropout, dtype, device, overwrite, resume, export=None):
    from ..training.lora import LoraSettings
    from ..runs.settings import RunOptions
    from ..training.loop import TrainSettings

    training = TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                             warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                             checkpoint_every=checkpoint_every, seed=seed)
    return RunOptions(training=training, lora=LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout),
                      dtype=dtype, device=device, overwrite=overwrite, resume=resume, export=export)


def _domain_settings(data, weights, references, dynamic, eval_every, eval_blocks, eta, clamp):
    from ..methods.sheared.domain_training import DomainSettings

    return DomainSettings(data=data, weights=weights, references=references, dynamic=dynamic, eval_every=eval_every,
                          eval_blocks=eval_blocks, eta=eta, clamp=clamp)


@commands.command(epilog="Examples:\n\n"
             "prunetune shear smollm2-135m --target layers=24,heads=6,kv-heads=3,intermediate=1024 --steps 100 "
             "--out runs/shear\n\n"
             "prunetune shear meta-llama/Llama-2-7b-hf --target layers=24,hidden=2048,heads=16,kv-heads=16,"
             "intermediate=5504 --data domains.yaml --dynamic-loading --lora --out runs/sheared-2.7b")
def shear(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out_dir: Path = options.out(),
    target: str = typer.Option(..., help="The shape to prune to: layers=,hidden=,heads=,kv-heads=,intermediate= "
                               "(omitted keys keep the source's), or the config.json (or directory) of a smaller "
                               "model; one pruned layer by layer (its layers differ, e.g. LoRAPrune's result) gives "
                               "each layer its own shape."),
    data: str = options.domains(), weights: Optional[str] = options.weights(),
    references: Optional[str] = options.references(), dynamic: bool = options.dynamic(),
    eval_every: int = options.eval_every(), eval_blocks: int = options.eval_blocks(), eta: float = options.eta(),
    clamp: bool = options.clamp(),
    steps: int = options.steps(), batch_size: int = options.batch_size(), grad_accum: int = options.grad_accum(),
    seq_len: int = options.seq_len(),
    lr: float = options.lr(FULL_LR, "Of the model's weights. " + SHEARED_LR_WHY),
    mask_lr: Optional[float] = typer.Option(None, show_default=False, help="Learning rate of the mask logits "
                                            "(default: 0.1 from an importance start; 1.0, the official code's, "
                                            "from --mask-init uniform)."),
    lambda_lr: float = typer.Option(1.0, help="Learning rate of the Lagrange multipliers, which ascend "
                                    "(official: 1.0)."),
    lambda2_init: float = typer.Option(5000.0, help="Starting value of λ2, the quadratic term's multiplier. Stiff "
                                       "keeps the masks on the warming target in short runs; 0 is the official "
                                       "code's start."),
    warmup_share: Optional[float] = typer.Option(None, show_default=False, help="Share of the steps over which "
                                                 "the target sparsity warms up linearly (default: 0 from an "
                                                 "importance start, whose masks start at the target; 0.2, the "
                                                 "official share, from --mask-init uniform)."),
    mask_init: str = typer.Option("taylor", help="Where the mask logits start: taylor, wanda-sp, magnitude or "
                                  "lora-guided orders them by that criterion's scores (whole layers by block "
                                  "influence), which also break final ties; uniform is the paper's tie."),
    init_samples: int = typer.Option(16, help="--mask-init: calibration sequences, spread over the domains."),
    distill: Optional[bool] = options.distill("Distil from the source model (default: on). With --lora it is the "
                                              "model itself with masks and adapters off (no memory); otherwise "
                                              "a second copy."),
    distill_alpha: Optional[float] = options.distill_alpha(0.5),
    distill_temperature: float = options.distill_temperature(),
    teacher_cache: Optional[Path] = options.teacher_cache(), teacher_top_k: int = options.teacher_top_k(),
    warmup: float = options.warmup(), lora: bool = options.train_lora(), lora_r: int = options.lora_r(),
    lora_alpha: int = options.lora_alpha(), lora_dropout: float = options.lora_dropout(),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    checkpoint_every: int = options.checkpoint_every(), resume: bool = options.resume(),
    seed: int = options.seed("data order, the masks' noise, LoRA's initialisation"),
    eval_data: str = options.eval_data(), no_eval: bool = options.no_eval(),
    eval_seq_len: int = options.eval_seq_len(), max_windows: Optional[int] = options.max_windows(),
    dtype: str = options.dtype(), device: str = options.device(), overwrite: bool = options.overwrite(),
    export: ExportOption = None,
) -> None:
    """Prune a model to a chosen architecture with learned hard-concrete masks (Sheared-LLaMA)."""
    gguf_outtype = parse_export(export)  # a shear target has one shape for every layer: GGUF holds it
    from ..runs.settings import EvalSettings
    from ..methods.sheared.shear import ShearSettings
    from ..methods.sheared.shear import shear as run_shear

    run_options = _options(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                       warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                       checkpoint_every=checkpoint_every, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                       lora_dropout=lora_dropout, dtype=dtype, device=device, overwrite=overwrite, resume=resume,
                       export=gguf_outtype)
    from ..training.distill import DistillSettings

    settings = ShearSettings(target=target, mask_lr=mask_lr, lambda_lr=lambda_lr, lambda2_init=lambda2_init,
                             warmup=warmup_share, lora=lora, mask_init=mask_init, init_samples=init_samples,
                             distill=DistillSettings(enabled=distill, alpha=distill_alpha,
                                                     temperature=distill_temperature,
                                                     cache=str(teacher_cache) if teacher_cache else None,
                                                     top_k=teacher_top_k))
    evaluation = EvalSettings(data=None if no_eval else eval_data, seq_len=eval_seq_len, max_windows=max_windows)
    record = run_shear(model, out_dir, settings,
                       _domain_settings(data, weights, references, dynamic, eval_every, eval_blocks, eta, clamp),
                       evaluation, run_options, log=log)
    if record.get("architecture"):
        _print_summary(record, out_dir)


@commands.command(epilog="Examples:\n\n"
             "prunetune train runs/shear --data code=builtin:stdlib-code,prose=builtin:pydoc --dynamic-loading "
             "--steps 100 --out runs/shear-trained\n\n"
             "prunetune train my-model --data domains.yaml --lora --reference-model big-model --out runs/cpt")
def train(
    model: Annotated[str, typer.Argument(help=MODEL_HELP + " A `prunetune shear` directory brings its "
                                         "reference losses.")],
    out_dir: Path = options.out(),
    data: str = options.domains(), weights: Optional[str] = options.weights(),
    references: Optional[str] = options.references(), dynamic: bool = options.dynamic(),
    eval_every: int = options.eval_every(), eval_blocks: int = options.eval_blocks(), eta: float = options.eta(),
    clamp: bool = options.clamp(),
    reference_model: Optional[str] = typer.Option(None, help="Measure the reference losses on this model (e.g. "
                                                  "the one it was pruned from)."),
    distill: Optional[bool] = options.distill("Distil from a teacher, a second model in memory (default: on when "
                                              "there is one: --teacher, or the source a shear directory names)."),
    teacher: Optional[str] = typer.Option(None, show_default=False, help="--distill: the teacher model (default: "
                                          "the source model a `prunetune shear` directory records)."),
    distill_alpha: Optional[float] = options.distill_alpha(0.5),
    distill_temperature: float = options.distill_temperature(),
    teacher_cache: Optional[Path] = options.teacher_cache(), teacher_top_k: int = options.teacher_top_k(),
    steps: int = options.steps(), batch_size: int = options.batch_size(), grad_accum: int = options.grad_accum(),
    seq_len: int = options.seq_len(),
    lr: float = options.lr(FULL_LR, SHEARED_LR_WHY),
    warmup: float = options.warmup(), lora: bool = options.train_lora(), lora_r: int = options.lora_r(),
    lora_alpha: int = options.lora_alpha(), lora_dropout: float = options.lora_dropout(),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    checkpoint_every: int = options.checkpoint_every(), resume: bool = options.resume(),
    seed: int = options.seed("data order and LoRA's initialisation"),
    eval_data: str = options.eval_data(), no_eval: bool = options.no_eval(),
    eval_seq_len: int = options.eval_seq_len(), max_windows: Optional[int] = options.max_windows(),
    dtype: str = options.dtype(), device: str = options.device(), overwrite: bool = options.overwrite(),
    export: ExportOption = None,
) -> None:
    """Continue pre-training a model on several domains (fixed mixture or dynamic batch loading)."""
    gguf_outtype = parse_export(export)
    from ..methods.sheared.continued import ContinueSettings, continue_training
    from ..runs.settings import EvalSettings

    run_options = _options(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                       warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                       checkpoint_every=checkpoint_every, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                       lora_dropout=lora_dropout, dtype=dtype, device=device, overwrite=overwrite, resume=resume,
                       export=gguf_outtype)
    evaluation = EvalSettings(data=None if no_eval else eval_data, seq_len=eval_seq_len, max_windows=max_windows)
    run_options.check()
    from ..layer_shapes import is_uniform
    from ..models import check_model

    if gguf_outtype:  # training keeps the shape it is given
        check_export_shape(gguf_outtype, model, per_layer=not is_uniform(check_model(model)))
    from ..training.distill import DistillSettings

    continue_settings = ContinueSettings(lora=lora, reference_model=reference_model, teacher=teacher,
                                         distill=DistillSettings(enabled=distill, alpha=distill_alpha,
                                                                 temperature=distill_temperature,
                                                                 cache=str(teacher_cache) if teacher_cache else None,
                                                                 top_k=teacher_top_k))
    record = continue_training(model, out_dir, continue_settings,
                               _domain_settings(data, weights, references, dynamic, eval_every, eval_blocks, eta,
                                                clamp),
                               evaluation, run_options, log=log)
    if record.get("architecture"):
        _print_summary(record, out_dir)


def _print_summary(record: dict, out_dir: Path) -> None:
    """Per-domain perplexity, reference losses and the final weights; the parameter count for shear."""
    params, results, data = record["parameters"], record["results"], record["data"]
    if "expected_by_masks" in params:
        out.print(f"target {record['target']['spec']}: {params['after']['total']:,} parameters "
                  f"(from {params['before']['total']:,}); the masks expected {params['expected_by_masks']:,} "
                  f"({params['expected_error']:+.2%})")
    table = Table(title=f"{record['command']}: held-out perplexity per domain")
    for column in ("domain", "perplexity", "reference loss", "final weight"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for name, p in results["domain_perplexity"].items():
        table.add_row(name, f"{p['perplexity']:.3f}", f"{data['reference_losses'][name]:.3f}",
                      f"{data['final_weights'][name]:.3f}")
    out.print(table)
    if "perplexity_before" in results:
        b, a = results["perplexity_before"], results["perplexity_after"]
        out.print(f"perplexity ({b['data']}): {b['perplexity']:.3f} -> {a['perplexity']:.3f}")
    out.print(f"reference losses: {data['reference_source']}; dynamic batch loading "
              f"{'on' if data['dynamic_loading'] else 'off'}")
    out.print(f"saved to {out_dir} as {record['architecture']['saved_as']}; took {record['elapsed_seconds']:.0f}s")
