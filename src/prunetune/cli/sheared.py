"""`prunetune shear` and `prunetune train`: Sheared-LLaMA's two stages on the command line.

The options both commands share are declared once below as annotated types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import MODEL_HELP, log, out
from .exporting import ExportOption, check_export_shape, parse_export

commands = typer.Typer()

DOMAINS_DEFAULT = "code=builtin:stdlib-code,prose=builtin:pydoc"

Out = Annotated[Path, typer.Option("--out", help="Output directory (written beside, renamed when complete).")]
Data = Annotated[str, typer.Option(help="Domains: name=SPEC,... (e.g. code=builtin:stdlib-code,prose=builtin:pydoc) "
                                   "or a YAML file with data, initial weights, references and scaling-law points.")]
Weights = Annotated[Optional[str], typer.Option(help="Initial domain proportions, e.g. code=0.7,prose=0.3 "
                                                "(default: the YAML's, or equal).")]
References = Annotated[Optional[str], typer.Option(help="Reference losses, e.g. code=1.9,prose=2.2 (default: the "
                                                   "source model's own per-domain loss, or a scaling-law fit from "
                                                   "the YAML).")]
Dynamic = Annotated[bool, typer.Option("--dynamic-loading/--fixed-mixture",
                                       help="Dynamic batch loading: re-weight the domains by how far each lags its "
                                       "reference loss every --eval-every steps (--fixed-mixture: keep the initial "
                                       "proportions).")]
EvalEvery = Annotated[int, typer.Option(help="Steps between per-domain validation losses (and weight updates).")]
EvalBlocks = Annotated[int, typer.Option(help="Held-out sequences per domain for that validation loss.")]
Eta = Annotated[float, typer.Option(help="Step size of the domain-weight update.")]
Clamp = Annotated[bool, typer.Option(help="Clamp the loss gap at zero (the paper); --no-clamp: the official code.")]
Steps = Annotated[int, typer.Option(help="Optimizer steps.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per micro-batch (per process).")]
GradAccum = Annotated[int, typer.Option(help="Micro-batches per optimizer step.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per training sequence.")]
Warmup = Annotated[float, typer.Option(help="Learning-rate warm-up, as a fraction of the steps.")]
Lora = Annotated[bool, typer.Option(help="Train a LoRA instead of every weight (less memory); merged when saved.")]
LoraR = Annotated[int, typer.Option(help="LoRA rank (with --lora).")]
Checkpointing = Annotated[bool, typer.Option(help="Trade compute for activation memory.")]
CheckpointEvery = Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (0: never).")]
Resume = Annotated[bool, typer.Option(help="Continue a killed run from its last checkpoint (same command).")]
Seed = Annotated[int, typer.Option(help="Seed of the data order, the masks' noise and LoRA's initialisation.")]
EvalData = Annotated[str, typer.Option(help="Data for one comparable perplexity before and after (besides every "
                                       "domain's held-out perplexity after).")]
NoEval = Annotated[bool, typer.Option("--no-eval", help="Skip the before/after perplexity.")]
EvalSeqLen = Annotated[int, typer.Option(help="Perplexity window length in tokens.")]
MaxWindows = Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows per data set.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Overwrite = Annotated[bool, typer.Option(help="Replace --out if it exists.")]


def _options(*, steps, batch_size, grad_accum, seq_len, lr, warmup, gradient_checkpointing, checkpoint_every, seed,
             lora_r, dtype, device, overwrite, resume, export=None):
    from ..training.lora import LoraSettings
    from ..runs.settings import RunOptions
    from ..training.loop import TrainSettings

    training = TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                             warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                             checkpoint_every=checkpoint_every, seed=seed)
    return RunOptions(training=training, lora=LoraSettings(r=lora_r, alpha=2 * lora_r), dtype=dtype, device=device,
                      overwrite=overwrite, resume=resume, export=export)


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
    out_dir: Out,
    target: Annotated[str, typer.Option(help="The shape to prune to: layers=,hidden=,heads=,kv-heads=,"
                                        "intermediate= (omitted keys keep the source's), or the config.json "
                                        "(or directory) of a smaller model.")],
    data: Data = DOMAINS_DEFAULT, weights: Weights = None, references: References = None,
    dynamic: Dynamic = False, eval_every: EvalEvery = 10, eval_blocks: EvalBlocks = 8, eta: Eta = 1.0,
    clamp: Clamp = True,
    steps: Steps = 100, batch_size: BatchSize = 4, grad_accum: GradAccum = 1, seq_len: SeqLen = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the model's weights (official: 1e-4).")] = 1e-4,
    mask_lr: Annotated[float, typer.Option(help="Learning rate of the mask logits (official: 1.0).")] = 1.0,
    lambda_lr: Annotated[float, typer.Option(help="Learning rate of the Lagrange multipliers, which ascend "
                                             "(official: 1.0).")] = 1.0,
    lambda2_init: Annotated[float, typer.Option(help="Starting value of λ2, the quadratic term's multiplier. "
                                                "Stiff keeps the masks on the warming target in short runs; "
                                                "0 is the official code's start.")] = 5000.0,
    warmup_share: Annotated[float, typer.Option(help="Share of the steps over which the target sparsity warms "
                                                "up linearly (official: 0.2).")] = 0.2,
    warmup: Warmup = 0.05, lora: Lora = False, lora_r: LoraR = 8,
    gradient_checkpointing: Checkpointing = False, checkpoint_every: CheckpointEvery = 0, resume: Resume = False,
    seed: Seed = 0, eval_data: EvalData = "builtin:pydoc", no_eval: NoEval = False,
    eval_seq_len: EvalSeqLen = 256, max_windows: MaxWindows = None, dtype: Dtype = "auto",
    device: Device = "auto", overwrite: Overwrite = False, export: ExportOption = None,
) -> None:
    """Prune a model to a chosen architecture with learned hard-concrete masks (Sheared-LLaMA)."""
    gguf_outtype = parse_export(export)  # a shear target has one shape for every layer: GGUF holds it
    from ..runs.settings import EvalSettings
    from ..methods.sheared.shear import ShearSettings
    from ..methods.sheared.shear import shear as run_shear

    options = _options(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                       warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                       checkpoint_every=checkpoint_every, seed=seed, lora_r=lora_r, dtype=dtype, device=device,
                       overwrite=overwrite, resume=resume, export=gguf_outtype)
    settings = ShearSettings(target=target, mask_lr=mask_lr, lambda_lr=lambda_lr, lambda2_init=lambda2_init,
                             warmup=warmup_share, lora=lora)
    evaluation = EvalSettings(data=None if no_eval else eval_data, seq_len=eval_seq_len, max_windows=max_windows)
    record = run_shear(model, out_dir, settings,
                       _domain_settings(data, weights, references, dynamic, eval_every, eval_blocks, eta, clamp),
                       evaluation, options, log=log)
    if record.get("architecture"):
        _print_summary(record, out_dir)


@commands.command(epilog="Examples:\n\n"
             "prunetune train runs/shear --data code=builtin:stdlib-code,prose=builtin:pydoc --dynamic-loading "
             "--steps 100 --out runs/shear-trained\n\n"
             "prunetune train my-model --data domains.yaml --lora --reference-model big-model --out runs/cpt")
def train(
    model: Annotated[str, typer.Argument(help=MODEL_HELP + " A `prunetune shear` directory brings its "
                                         "reference losses.")],
    out_dir: Out,
    data: Data = DOMAINS_DEFAULT, weights: Weights = None, references: References = None,
    dynamic: Dynamic = False, eval_every: EvalEvery = 10, eval_blocks: EvalBlocks = 8, eta: Eta = 1.0, clamp: Clamp = True,
    reference_model: Annotated[Optional[str], typer.Option(help="Measure the reference losses on this model "
                                                           "(e.g. the one it was pruned from).")] = None,
    steps: Steps = 100, batch_size: BatchSize = 4, grad_accum: GradAccum = 1, seq_len: SeqLen = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine schedule).")] = 1e-4,
    warmup: Warmup = 0.05, lora: Lora = False, lora_r: LoraR = 8,
    gradient_checkpointing: Checkpointing = False, checkpoint_every: CheckpointEvery = 0, resume: Resume = False,
    seed: Seed = 0, eval_data: EvalData = "builtin:pydoc", no_eval: NoEval = False,
    eval_seq_len: EvalSeqLen = 256, max_windows: MaxWindows = None, dtype: Dtype = "auto",
    device: Device = "auto", overwrite: Overwrite = False, export: ExportOption = None,
) -> None:
    """Continue pre-training a model on several domains (fixed mixture or dynamic batch loading)."""
    gguf_outtype = parse_export(export)
    from ..methods.sheared.continued import ContinueSettings, continue_training
    from ..runs.settings import EvalSettings

    options = _options(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                       warmup=warmup, gradient_checkpointing=gradient_checkpointing,
                       checkpoint_every=checkpoint_every, seed=seed, lora_r=lora_r, dtype=dtype, device=device,
                       overwrite=overwrite, resume=resume, export=gguf_outtype)
    evaluation = EvalSettings(data=None if no_eval else eval_data, seq_len=eval_seq_len, max_windows=max_windows)
    from ..layer_shapes import is_uniform
    from ..models import check_model

    if gguf_outtype:  # training keeps the shape it is given
        check_export_shape(gguf_outtype, model, per_layer=not is_uniform(check_model(model)))
    record = continue_training(model, out_dir, ContinueSettings(lora=lora, reference_model=reference_model),
                               _domain_settings(data, weights, references, dynamic, eval_every, eval_blocks, eta,
                                                clamp),
                               evaluation, options, log=log)
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
