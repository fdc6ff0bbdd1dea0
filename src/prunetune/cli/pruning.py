"""`prunetune prune` (every pruning method, LoRAPrune's included) and `prunetune masks-agree`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import options
from .common import check_json_path, log, out
from .flags import deprecating_command
from .options import MODEL_HELP
from .exporting import ExportOption, check_export_shape, parse_export

commands = typer.Typer()


@commands.command(epilog="Examples:\n\n"
             "prunetune prune smollm2-135m --ratio 0.5 --data builtin:pydoc --steps 200 --out runs/lp50\n\n"
             "prunetune prune smollm2-135m --method taylor --ratio 0.2 --recover-steps 100 --out runs/taylor20")
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = options.out(),
    method: str = typer.Option("loraprune", help="loraprune (progressive, LoRA-guided: prunetune's best, see the "
                               "README's quality table), or one-shot: magnitude, taylor, wanda-sp, random, "
                               "lora-guided (LoRAPrune's criterion once, from calibration batches)."),
    ratio: float = options.ratio(0.2),
    layers: Optional[str] = options.layers(why="Default: paper for loraprune (the official code's), all for the "
                                           "one-shot methods."),
    units: Optional[str] = options.units(),
    head_unit: str = options.head_unit(),
    round_to: str = options.round_to(),
    allocation: str = typer.Option("uniform", help="uniform (same ratio in every pruned layer) or global (rank units "
                                   "across layers)."),
    split: str = typer.Option("cost", help="How a budget is shared by heads and channels: cost (rank them by "
                              "importance per parameter; a head goes only when it is worth less than the "
                              "channels it spares) or heads-first (every layer loses --ratio of its heads, "
                              "channels fill the rest: the official code and LLM-Pruner)."),
    data: str = typer.Option("builtin:pydoc", help="Training data (loraprune, recovery) and calibration data "
                             "(taylor, wanda-sp)."),
    steps: int = options.steps(why="loraprune: the LoRA training while pruning."),
    recover_steps: int = typer.Option(0, help="One-shot methods: LoRA fine-tuning steps after pruning (merged "
                                      "before saving)."),
    calib_samples: int = options.calib_samples(),
    score: str = options.score(),
    normalize: str = options.normalize("model with --split cost, module with heads-first (loraprune)."),
    prune_every: int = typer.Option(10, help="loraprune: steps between mask updates."),
    prune_warmup: float = typer.Option(0.05, help="loraprune: fraction of the steps before pruning starts "
                                       "(the official code: 0.1)."),
    prune_cooldown: float = typer.Option(0.5, help="loraprune: fraction of the steps trained at the final shape "
                                         "(the cubic schedule reaches the target at 1 - this; the official "
                                         "code: 0.1)."),
    distill: Optional[bool] = options.distill(
        "Train against the unpruned model's next-token distributions (KL divergence). loraprune: on by default, "
        "the teacher is the model itself with its masks off, no second copy (the paper's exact recipe: "
        "--no-distill --split heads-first --normalize module --prune-warmup 0.1 --prune-cooldown 0.1); "
        "--recover-steps: off by default, the teacher is the source model, loaded a second time."),
    teacher: str = typer.Option("base", help="--distill with loraprune: base (adapters off: the pretrained model) "
                                "or tuned (adapters on: the unpruned model as it fine-tunes)."),
    distill_temperature: float = options.distill_temperature(),
    distill_alpha: Optional[float] = options.distill_alpha("0.5 for loraprune, 1 for --recover-steps"),
    teacher_cache: Optional[Path] = options.teacher_cache(), teacher_top_k: int = options.teacher_top_k(),
    ema: float = typer.Option(0.9, help="loraprune: weight of the old moving-average score."),
    lora_r: int = options.lora_r(),
    lora_alpha: int = options.lora_alpha(),
    lora_dropout: float = options.lora_dropout(),
    lora_dtype: str = options.lora_dtype(),
    batch_size: int = options.batch_size(),
    grad_accum: int = options.grad_accum(),
    seq_len: int = options.seq_len(),
    lr: float = options.lr(),
    warmup: float = options.warmup(),
    max_grad_norm: float = options.max_grad_norm(),
    gradient_checkpointing: bool = options.gradient_checkpointing(),
    checkpoint_every: int = options.checkpoint_every(),
    resume: bool = options.resume(),
    seed: int = options.seed("data order, LoRA's initialisation, the random criterion"),
    eval_data: str = options.eval_data(),
    no_eval: bool = options.no_eval(),
    eval_seq_len: int = options.eval_seq_len(),
    max_windows: Optional[int] = options.max_windows(),
    dtype: str = options.dtype(),
    device: str = options.device(),
    quant: Optional[str] = options.quant(),
    overwrite: bool = options.overwrite(),
    export: ExportOption = None,
) -> None:
    """Prune a model to a ratio of its prunable parameters and save the smaller model."""
    gguf_outtype = parse_export(export)
    from ..training.distill import DistillSettings
    from ..training.lora import LoraSettings
    from ..methods.loraprune.pruner import LoRAPruneSettings
    from ..runs.settings import EvalSettings, RunOptions
    from ..methods.prune import PruneSettings
    from ..methods.prune import prune as run_prune
    from ..structure.allocate import parse_round_to
    from ..training.loop import TrainSettings

    settings = PruneSettings(method=method, ratio=ratio, layers=layers, units=units, head_unit=head_unit,
                             round_to=parse_round_to(round_to), allocation=allocation,
                             split=split, data=data, calib_samples=calib_samples, recover_steps=recover_steps,
                             seed=seed,
                             loraprune=LoRAPruneSettings(prune_every=prune_every, ema=ema, score=score,
                                                         normalize=normalize, warmup=prune_warmup,
                                                         cooldown=prune_cooldown),
                             distill=DistillSettings(enabled=distill, temperature=distill_temperature,
                                                     alpha=distill_alpha, teacher=teacher,
                                                     cache=str(teacher_cache) if teacher_cache else None,
                                                     top_k=teacher_top_k))
    evaluation = EvalSettings(data=None if no_eval else eval_data, seq_len=eval_seq_len, max_windows=max_windows)
    run_options = RunOptions(
        training=TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                               warmup=warmup, max_grad_norm=max_grad_norm,
                               gradient_checkpointing=gradient_checkpointing,
                               checkpoint_every=checkpoint_every, seed=seed),
        lora=LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, dtype=lora_dtype),
        dtype=dtype, device=device, quant=quant, overwrite=overwrite, resume=resume, export=gguf_outtype,
    )
    check_export_shape(gguf_outtype, model, per_layer=settings.layer_spec != "all")
    record = run_prune(model, out_dir, settings, evaluation, run_options, log=log)
    if record.get("architecture"):  # only the main process of a multi-GPU run prints
        _print_prune_summary(record, out_dir)


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
    out.print(f"ratio of prunable parameters removed: target {params['ratio_target']:.3f}, "
              f"achieved {params['ratio_achieved']:.3f}")
    out.print(f"prunable parameters: {record['prunable']}")
    if "perplexity_before" in results:
        out.print(f"perplexity protocol: {results['perplexity_before']['protocol']}")
    from ..runs.card import loaders

    out.print(f"saved to {out_dir} as {record['architecture']['saved_as']} (load with {loaders(record)}); "
              f"took {record['elapsed_seconds']:.0f}s")


@commands.command("masks-agree", cls=deprecating_command("masks-agree"), epilog="Examples:\n\n"
             "prunetune masks-agree smollm2-135m --ratios 0.1,0.2,0.3,0.5 --json agree.json\n\n"
             "prunetune masks-agree smollm2-135m --steps 100 --batches 16 --layers paper")
def masks_agree_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ratios: str = typer.Option("0.1,0.2,0.3,0.5", help="Pruning ratios to compare at, comma-separated, each in "
                               "(0, 1)."),
    batches: int = typer.Option(8, help="Calibration batches; both criteria see the same ones."),
    batch_size: int = options.batch_size(1, why="One: each calibration batch is one sequence."),
    seq_len: int = options.seq_len(128, why="128 here: calibration sequences, as LLM-Pruner's."),
    data: str = typer.Option("builtin:pydoc", help="Calibration (and LoRA training) data; its train split."),
    layers: str = options.layers("all", why="All here: the agreement is measured in every layer."),
    units: str = options.units("heads,channels"),
    head_unit: str = options.head_unit(),
    round_to: str = options.round_to("1", why="1 here, so that rounding does not decide the agreement."),
    steps: int = options.steps(0, why="Here the LoRA's training before scoring (0: an untrained LoRA with a "
                               "random B)."),
    lr: float = options.lr(),
    lora_r: int = options.lora_r(),
    lora_alpha: int = options.lora_alpha(),
    score: str = options.score(),
    normalize: str = options.normalize("module here, as LoRAPrune's under the heads-first split every "
                                       "comparison uses."),
    seed: int = options.seed("LoRA's initialisation and training"),
    json_path: Optional[Path] = options.json_path(),
    dtype: str = options.dtype(),
    device: str = options.device(),
) -> None:
    """Overlap of the units the LoRA-guided criterion and vanilla Taylor keep, from the same batches."""
    from ..methods.loraprune.masks_agree import AgreeSettings, agreement_table, masks_agree, parse_ratios
    from ..report import write_json
    from ..structure.allocate import parse_round_to

    settings = AgreeSettings(ratios=parse_ratios(ratios), batches=batches, batch_size=batch_size, seq_len=seq_len,
                             data=data, layers=layers, units=units, head_unit=head_unit,
                             round_to=parse_round_to(round_to, "AgreeSettings.round_to"),
                             steps=steps, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, score=score,
                             normalize=normalize, seed=seed)
    settings.check()
    check_json_path(json_path)
    record = masks_agree(model, settings, dtype=dtype, device=device, log=lambda msg: out.print(f"[dim]{msg}[/dim]"))
    out.print(agreement_table(record))
    out.print(f"LoRA: {record['lora']}; gradients: {record['criteria']['gradients']}")
    out.print("overlap = shared units / units kept (or pruned) by taylor; random = expected overlap of random "
              f"choices with the same per-layer counts; took {record['elapsed_seconds']:.0f}s")
    if json_path:
        write_json(json_path, record)


