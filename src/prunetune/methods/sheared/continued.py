"""Continued pre-training (`prunetune train`): the shared training loop on several domains.

Sheared-LLaMA's second stage: the pruned model trains on the same domains, full-parameter (the paper)
or with a LoRA (merged into the saved model), with a fixed mixture or dynamic batch loading. The
reference losses default to what the shear run recorded (its source model's per-domain loss), so the
two stages chase the same references; `--reference-model` measures another model's, and
`--references` / a scaling law in the domain file give them outright.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ...export.hf import save_model
from ...errors import UserError
from ...evaluate.perplexity import check_seq_len
from ...models import check_model, load_model
from ...report import (
    check_output_dir,
    is_run_directory,
    provenance,
    read_record,
    run_directory,
    write_json,
    write_report,
)
from ...structure.units import Structure, count_parameters
from ...training.loop import make_accelerator, train
from .domains import DomainSet
from .domain_training import DomainSettings, check_before_loading, domain_perplexities, prepare_domains, trainable
from .dynamic_loading import domain_losses
from ...runs.settings import EvalSettings, RunOptions, checkpoint_dir_for


@dataclass
class ContinueSettings:
    lora: bool = False  # full-parameter by default, as the paper's continued pre-training
    reference_model: str | None = None  # measure the references on this model instead


def _recorded_references(model_spec: str) -> dict[str, float]:
    """The per-domain reference losses a `prunetune shear` run directory recorded (its source model's)."""
    if not is_run_directory(Path(model_spec)):
        return {}
    return read_record(Path(model_spec)).get("data", {}).get("reference_losses") or {}


def _source_losses(model_spec: str, settings: ContinueSettings, domain_settings: DomainSettings, domains: DomainSet,
                   options: RunOptions, batch_size: int):
    """Where the default references come from: --reference-model, else the shear run's record; a fixed
    mixture without either measures the model itself at the start (the gaps are then only logged).
    Decided before the model loads, so a dynamic run without references fails at once."""
    recorded = _recorded_references(model_spec)
    missing = [d.name for d in domains.domains if d.reference is None]
    if (domain_settings.dynamic and missing and not settings.reference_model and not domains.scaling_points
            and not set(missing) <= set(recorded)):
        raise UserError(
            "dynamic batch loading needs reference losses: pass --references name=loss,..., --reference-model "
            "(e.g. the model it was pruned from), or a shear run directory that recorded them for these domains")

    def losses(model, eval_sets: dict) -> tuple[dict[str, float], str]:
        if settings.reference_model:
            reference, _ = load_model(settings.reference_model, dtype=options.dtype, device=options.device)
            return domain_losses(reference, eval_sets, batch_size), f"{settings.reference_model}'s loss"
        if set(eval_sets) <= set(recorded):
            return {name: recorded[name] for name in eval_sets}, "the shear run's source model's loss"
        return domain_losses(model, eval_sets, batch_size), "this model's own loss before training"

    return losses


def continue_training(model_spec: str, out: Path, settings: ContinueSettings, domain_settings: DomainSettings,
                      evaluation: EvalSettings, options: RunOptions | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Train `model_spec` on the domains and save it (LoRA merged) to `out`; returns the record."""
    started = time.perf_counter()
    options = options or RunOptions()
    out = Path(out)
    training = options.training
    training.check()
    domains = domain_settings.check()
    check_output_dir(out, options.overwrite)
    reference_losses = _source_losses(model_spec, settings, domain_settings, domains, options, training.batch_size)
    if options.quant:
        raise UserError("prunetune train saves a dense model; --quant is not supported here (use --lora)")
    check_before_loading(model_spec, evaluation, options)
    if settings.reference_model:
        check_model(settings.reference_model)  # it loads after the model; a bad spec fails now
    accelerator = make_accelerator(training)
    is_main = accelerator.is_main_process
    quiet_log = log if is_main else (lambda _: None)
    model, tokenizer = load_model(model_spec, dtype=options.dtype,
                                  device=str(accelerator.device) if options.device == "auto" else options.device)
    check_seq_len(model, training.seq_len)
    check_seq_len(model, evaluation.seq_len)  # every domain's held-out perplexity is measured at the end
    params = count_parameters(model)
    results: dict = {}
    if evaluation.data and is_main:
        results["perplexity_before"] = evaluation.measure(model, tokenizer, "before", options.progress, quiet_log)
    whose: list[str] = []

    def source_losses(eval_sets: dict) -> dict[str, float]:
        losses, description = reference_losses(model, eval_sets)
        whose.append(description)
        return losses

    run_domains = prepare_domains(model, tokenizer, domain_settings, domains, training, accelerator,
                                  target_parameters=params["total"], source_losses=source_losses)
    if whose:  # say whose loss "the source model's" was
        run_domains.reference_source = run_domains.reference_source.replace("source model's loss", whose[0])
    quiet_log("reference losses (" + run_domains.reference_source + "): "
              + ", ".join(f"{k} {v:.3f}" for k, v in run_domains.references.items()))
    model = trainable(model, options.lora if settings.lora else None, training.seed)
    run = train(model, run_domains.blocks, run_domains.loss_mask, training, hooks=run_domains.hook,
                sampler=run_domains.sampler, accelerator=accelerator, checkpoint_dir=checkpoint_dir_for(out),
                resume=options.resume, progress=options.progress, log=quiet_log)
    model = run.model  # under FSDP: the gathered model on the main process, None on the others
    if evaluation.data and is_main:
        results["perplexity_after"] = evaluation.measure(model, tokenizer, "after", options.progress, quiet_log)
    if is_main:
        results["domain_perplexity"] = domain_perplexities(model, tokenizer, domains, evaluation.seq_len,
                                                           evaluation.max_windows, options.progress)
    carried = {}
    if is_run_directory(Path(model_spec)):
        source = read_record(Path(model_spec))
        carried = {k: source[k] for k in ("source_model", "target", "kept") if k in source}
    record = provenance(
        "train", model=model_spec, method="continued pre-training", **carried,
        settings=asdict(settings) | {"dtype": options.dtype} | ({"lora": asdict(options.lora)} if settings.lora else {}),
        parameters={"total": params["total"], "non_embedding": params["non_embedding"]},
        data=asdict(domain_settings) | run_domains.record(),
        results=results,
        training=run.record(training),
    )
    accelerator.wait_for_everyone()
    if is_main:
        with run_directory(out, options.overwrite) as tmp:
            model, saved_as = save_model(model, tokenizer, tmp)
            structure = Structure.of(model)
            record["architecture"] = {"saved_as": saved_as, "stock_loadable": structure.uniform,
                                      "layer_shapes": [asdict(s) for s in structure.layers]}
            record["elapsed_seconds"] = round(time.perf_counter() - started, 1)
            write_json(tmp / "prunetune.json", record)
            write_report(tmp)
        shutil.rmtree(checkpoint_dir_for(out), ignore_errors=True)
    accelerator.wait_for_everyone()
    return record
