"""Continued pre-training (`prunetune train`): the shared training loop on several domains.

Sheared-LLaMA's second stage: the pruned model trains on the same domains, full-parameter (the paper)
or with a LoRA (merged into the saved model), with a fixed mixture or dynamic batch loading. The
reference losses default to what the shear run recorded (its source model's per-domain loss), so the
two stages chase the same references; `--reference-model` measures another model's, and
`--references` / a scaling law in the domain file give them outright.

Distillation (on by default when there is a teacher): the model learns the teacher's next-token
distributions mixed with the language-model loss. The teacher is `--teacher`, or the source model
a shear run directory records, loaded a second time (frozen, no gradients), or, with
`--teacher-cache`, its top-k next-token log-probabilities computed once and read from disk
(training/teacher_cache.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import SettingError
from ...models import check_model, load_model
from ...report import is_run_directory, read_record
from ...structure.units import count_parameters
from ...training.distill import DistillSettings, model_teacher
from ...training.rates import FULL_LR
from .domains import DomainSet
from .domain_training import DomainSettings, domain_perplexities, prepare_domains, trainable
from .dynamic_loading import domain_losses
from ...runs.lifecycle import Run
from ...runs.settings import EvalSettings, RunOptions


@dataclass
class ContinueSettings:
    lora: bool = False  # full-parameter by default, as the paper's continued pre-training
    reference_model: str | None = None  # measure the references on this model instead
    teacher: str | None = None  # distil from this model (default: the source a shear run records)
    distill: DistillSettings = field(default_factory=DistillSettings)  # None fields: the method's default


def _teacher_spec(model_spec: str, settings: ContinueSettings) -> str | None:
    """The teacher to distil from: --teacher, else the source model a shear run directory names."""
    if settings.teacher:
        return settings.teacher
    if is_run_directory(Path(model_spec)):
        return read_record(Path(model_spec)).get("source_model")
    return None


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
        raise SettingError(
            "DomainSettings.dynamic", "DomainSettings.dynamic batch loading needs reference losses: pass "
            "DomainSettings.references name=loss,..., ContinueSettings.reference_model (e.g. the model it was "
            "pruned from), or a shear run directory that recorded them for these domains")

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
    options = options or RunOptions()
    training = options.training
    domains = reference_losses = None
    teacher_spec = _teacher_spec(model_spec, settings)
    distill = settings.distill.resolved("continued")
    if settings.distill.enabled is None and teacher_spec is None:
        distill.enabled = False  # on by default only where there is a teacher

    def check_settings() -> None:
        nonlocal domains, reference_losses
        distill.check_model_teacher("continued training")
        if distill.enabled and teacher_spec is None:
            raise SettingError("DistillSettings.enabled", "DistillSettings.enabled needs a teacher: pass "
                               "ContinueSettings.teacher, or train a `prunetune shear` directory (its source model)")
        if distill.enabled:
            check_model(teacher_spec)  # it loads after the model; a bad spec fails now

        domains = domain_settings.check()
        reference_losses = _source_losses(model_spec, settings, domain_settings, domains, options, training.batch_size)
        if options.quant:
            raise SettingError("RunOptions.quant", "continued training saves a dense model; RunOptions.quant is not "
                               "supported here (use ContinueSettings.lora to save memory)")
        if settings.reference_model:
            check_model(settings.reference_model)  # it loads after the model; a bad spec fails now

    # every domain's held-out perplexity is measured at the end, at the evaluation's length
    run = Run("train", out, options, evaluation, log=log, checks=[check_settings], model=model_spec, lr=FULL_LR,
              seq_lens={"TrainSettings.seq_len": training.seq_len, "EvalSettings.seq_len": evaluation.seq_len})
    training = run.options.training  # its learning rate decided
    model, tokenizer = run.load(model_spec, seq_lens=[training.seq_len, evaluation.seq_len])
    params = count_parameters(model)
    run.perplexity(model, tokenizer, "before")
    whose: list[str] = []

    def source_losses(eval_sets: dict) -> dict[str, float]:
        losses, description = reference_losses(model, eval_sets)
        whose.append(description)
        return losses

    run_domains = prepare_domains(model, tokenizer, domain_settings, domains, training, run.accelerator,
                                  target_parameters=params["total"], source_losses=source_losses)
    if whose:  # say whose loss "the source model's" was
        run_domains.reference_source = run_domains.reference_source.replace("source model's loss", whose[0])
    run.log("reference losses (" + run_domains.reference_source + "): "
            + ", ".join(f"{k} {v:.3f}" for k, v in run_domains.references.items()))
    model = trainable(model, options.lora if settings.lora else None, training.seed)
    teacher, held = None, {}
    if distill.enabled:
        teacher, held = model_teacher(teacher_spec, distill, run_domains.blocks, dtype=options.dtype,
                                      accelerator=run.accelerator, seq_len=training.seq_len,
                                      batch_size=training.batch_size, log=run.log)
    trained = run.train(model, run_domains.blocks, run_domains.loss_mask, hooks=run_domains.hook,
                        sampler=run_domains.sampler, teacher=teacher, distill=distill)
    if trained.distill:
        trained.distill |= held
    del teacher
    model = trained.model  # under FSDP: the gathered model on the main process, None on the others
    if model is None:
        return run.leave()
    run.perplexity(model, tokenizer, "after")
    if run.is_main:
        run.results["domain_perplexity"] = domain_perplexities(model, tokenizer, domains, evaluation.seq_len,
                                                               evaluation.max_windows, options.progress)
    carried = {}
    if is_run_directory(Path(model_spec)):
        source = read_record(Path(model_spec))
        carried = {k: source[k] for k in ("source_model", "target", "kept") if k in source}
    return run.finish(
        model, tokenizer, model=model_spec, method="continued pre-training", **carried,
        settings=asdict(settings) | {"distill": asdict(distill), "dtype": options.dtype}
        | ({"lora": asdict(options.lora.resolved())} if settings.lora else {}),
        parameters={"total": params["total"], "non_embedding": params["non_embedding"]},
        data=asdict(domain_settings) | run_domains.record(),
        training=trained.record(training),
    )
