"""The pruning pipeline every pruning method shares.

load -> (score once | LoRAPrune training) -> masks -> cut -> (LoRA recovery) -> merge -> save -> evaluate

One-shot criteria (magnitude, taylor, wanda-sp, random, lora-guided) score every unit once from the
weights and, where they need it, calibration batches; `recover_steps` then fine-tunes a LoRA on the
cut model so methods compare at the same training budget. LoRAPrune scores while it trains and
prunes progressively (methods/loraprune/pruner.py). Either way the result is cut, LoRA merged, and saved as
a smaller dense model with prunetune.json and report.md.

With distillation (distill.py) LoRAPrune's teacher is the model it trains, masks suspended: no
second copy. A one-shot method's distilled recovery loads the source model a second time as its
teacher, and the record says what that copy costs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..export.hf import save_model
from ..data import load_blocks, load_examples
from ..training.distill import DistillSettings, ModelTeacher, self_teacher_for
from ..errors import SettingError, UserError
from ..evaluate.perplexity import check_seq_len
from ..importance import CRITERIA
from ..training.lora import add_lora
from ..models import check_load_options, check_model, load_model
from ..structure.scores import SCORES_FILE, save_scores
from ..importance.sharded import SHARDED_CRITERIA
from ..training.sharding import is_fsdp, leave_to_main, refuse_quant_under_fsdp
from ..report import check_output_dir, extra_file, provenance, run_directory, write_json, write_report
from ..structure.allocate import (
    ALLOCATIONS,
    DEFAULT_ROUND_TO,
    DEFAULT_SPLIT,
    SPLITS,
    achieved_ratio,
    check_ratio,
    describe_prunable,
    parse_layers,
    parse_round_to,
    parse_units,
    select_masks,
)
from ..structure.surgery import cut
from ..structure.units import HEAD_UNITS, Structure, count_parameters
from ..runs.settings import EvalSettings, RunOptions, checkpoint_dir_for
from ..training.loop import TrainSettings, make_accelerator, train
from .loraprune.pruner import LoRAPruneSettings, LoRAPruner

METHODS = ("loraprune", *CRITERIA)
NEEDS_CALIBRATION = ("taylor", "wanda-sp", "lora-guided")


@dataclass
class PruneSettings:
    method: str = "loraprune"  # prunetune's best method (README's quality table)
    ratio: float = 0.2
    layers: str | None = None  # None: 'paper' for loraprune (the official choice), 'all' otherwise
    units: str = "heads,channels"
    head_unit: str = "kv-group"
    round_to: int | str = DEFAULT_ROUND_TO  # 'auto': 128 on wide MLPs, 64 on narrow ones (allocate.py)
    allocation: str = "uniform"
    split: str = DEFAULT_SPLIT  # how a budget is shared by heads and channels (structure/allocate.py)
    data: str = "builtin:pydoc"  # training data (loraprune, recovery) and calibration batches
    calib_samples: int = 10  # calibration sequences for taylor and wanda-sp (LLM-Pruner: 10)
    recover_steps: int = 0  # LoRA steps after a one-shot prune
    seed: int = 0
    loraprune: LoRAPruneSettings = field(default_factory=LoRAPruneSettings)  # used by method loraprune
    distill: DistillSettings = field(default_factory=DistillSettings)  # loraprune, or a recovery's teacher

    @property
    def layer_spec(self) -> str:
        return self.layers or ("paper" if self.method == "loraprune" else "all")

    def check(self) -> None:
        """Every check of these settings alone (the layers need the model's config: parse_layers)."""
        if self.method not in METHODS:
            raise SettingError("PruneSettings.method", f"unknown PruneSettings.method '{self.method}'; available: "
                               f"{', '.join(METHODS)}")
        check_ratio(self.ratio)
        parse_units(self.units)
        for name, choices in (("head_unit", HEAD_UNITS), ("allocation", ALLOCATIONS), ("split", SPLITS)):
            if getattr(self, name) not in choices:
                raise SettingError(f"PruneSettings.{name}", f"unknown PruneSettings.{name} '{getattr(self, name)}'; "
                                   f"use {' or '.join(choices)}")
        parse_round_to(self.round_to)
        if self.recover_steps < 0:
            raise SettingError("PruneSettings.recover_steps",
                               f"PruneSettings.recover_steps must be 0 or more, got {self.recover_steps}")
        if self.calib_samples < 1:
            raise SettingError("PruneSettings.calib_samples",
                               f"PruneSettings.calib_samples must be at least 1, got {self.calib_samples}")
        if self.method == "loraprune" and self.recover_steps:
            raise SettingError("PruneSettings.recover_steps", "PruneSettings.recover_steps is for one-shot methods; "
                               "loraprune trains for TrainSettings.steps")
        if self.method == "loraprune":
            self.loraprune.check()
        self.distill.check()
        if self.distill.enabled:
            if self.method != "loraprune" and not self.recover_steps:
                raise SettingError("DistillSettings.enabled", "DistillSettings.enabled trains against a teacher: use "
                                   "it with loraprune or with PruneSettings.recover_steps")
            if self.method != "loraprune" and self.distill.teacher == "tuned":
                raise SettingError("DistillSettings.teacher", "DistillSettings.teacher tuned is LoRAPrune's (the "
                                   "unpruned model as it fine-tunes); a one-shot method's recovery distils from the "
                                   "source model: leave DistillSettings.teacher at base")


def _check_before_loading(model_spec: str, settings: PruneSettings, evaluation: EvalSettings, options: RunOptions,
                          trains: bool) -> None:
    """Everything that can be wrong without the weights: a mistake costs seconds, not a model load."""
    settings.check()
    if trains:
        options.training.check()
    if settings.method == "loraprune":
        settings.loraprune.check()
    distill = settings.distill
    if distill.enabled:
        distill.check()
        if not trains:
            raise UserError("--distill trains against a teacher: use it with loraprune or with --recover-steps")
        if settings.method != "loraprune" and distill.teacher == "tuned":
            raise UserError("--teacher tuned is LoRAPrune's (the unpruned model as it fine-tunes); a one-shot "
                            "method's recovery distils from the source model: leave --teacher at base")
    if evaluation.max_windows is not None and evaluation.max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {evaluation.max_windows}")
    if evaluation.data:
        load_examples(evaluation.data, default_split="eval")
    if trains or settings.method in NEEDS_CALIBRATION:
        load_examples(settings.data, default_split="train")
    check_load_options(options.dtype, options.device, options.quant)
    seq_lens = {"--eval-seq-len": evaluation.seq_len} if evaluation.data else {}
    if trains or settings.method in NEEDS_CALIBRATION:
        seq_lens["--seq-len"] = options.training.seq_len
    config = check_model(model_spec, seq_lens)  # a missing model, an unknown architecture, too long a sequence
    parse_layers(settings.layer_spec, int(config.num_hidden_layers))


def _without_method_groups(items) -> dict:
    """asdict's factory that leaves out the nested settings; the record adds those that apply."""
    return {k: v for k, v in items if k not in ("loraprune", "distill")}


def prune(model_spec: str, out: Path, settings: PruneSettings, evaluation: EvalSettings,
          options: RunOptions | None = None, log: Callable[[str], None] = print) -> dict:
    """Prune `model_spec` and save the smaller model in `out`; returns prunetune.json's record."""
    started = time.perf_counter()
    options = options or RunOptions()
    out = Path(out)
    training = options.training
    trains = settings.method == "loraprune" or settings.recover_steps > 0
    settings.distill = settings.distill.resolved(settings.method)
    distill = settings.distill
    _check_before_loading(model_spec, settings, evaluation, options, trains)
    check_output_dir(out, options.overwrite)
    refuse_quant_under_fsdp(options.quant)
    accelerator = make_accelerator(training)
    is_main = accelerator.is_main_process
    quiet_log = log if is_main else (lambda _: None)

    model, tokenizer = load_model(model_spec, dtype=options.dtype,
                                  device=str(accelerator.device) if options.device == "auto" else options.device,
                                  quant=options.quant)
    before = Structure.of(model)
    layers = parse_layers(settings.layer_spec, before.num_layers)
    units = parse_units(settings.units)
    if evaluation.data:
        check_seq_len(model, evaluation.seq_len)
    if trains or settings.method in NEEDS_CALIBRATION:
        check_seq_len(model, training.seq_len)
    params_before = count_parameters(model) | {"prunable": before.prunable_params(layers, units)}

    results: dict = {}
    if evaluation.data and is_main:
        results["perplexity_before"] = evaluation.measure(model, tokenizer, "before", options.progress, quiet_log)

    blocks = mask = None
    if trains or settings.method in NEEDS_CALIBRATION:
        blocks, mask = load_blocks(settings.data, tokenizer, training.seq_len, default_split="train")
    checkpoints = checkpoint_dir_for(out)
    record_training = {}

    if settings.method == "loraprune":
        torch.manual_seed(settings.seed)  # the adapter's initialisation depends on the seed alone
        model = add_lora(model, options.lora)
        pruner = LoRAPruner(model, before, ratio=settings.ratio, layers=layers, units=units,
                            head_unit=settings.head_unit, round_to=settings.round_to,
                            allocation=settings.allocation, settings=settings.loraprune, total_steps=training.steps,
                            split=settings.split)
        teacher = self_teacher_for(model, pruner.masks_off, distill) if distill.enabled else None
        run = train(model, blocks, mask, training, hooks=pruner, accelerator=accelerator,
                    checkpoint_dir=checkpoints, resume=options.resume, progress=options.progress, log=quiet_log,
                    teacher=teacher, distill=distill)
        if run.distill:
            run.distill |= {"teacher": distill.teacher, "teacher_model_bytes": 0}  # the trained model itself
        model = run.model  # under FSDP: gathered on the main process, None on the others
        masks = pruner.finish()
        scores = pruner.average
        record_training = {"training": run.record(training) | {"schedule": pruner.history}}
    else:
        batches = None
        if settings.method in NEEDS_CALIBRATION:
            calib = blocks[: settings.calib_samples].to(accelerator.device)
            batches = list(calib.split(training.batch_size))
        if is_fsdp(accelerator) and settings.method in SHARDED_CRITERIA:  # each process scores its own rows
            scores, model = SHARDED_CRITERIA[settings.method](model, batches)
        else:
            scores = CRITERIA[settings.method](model, batches, seed=settings.seed)
        masks = select_masks(before, scores, settings.ratio, layers, units, settings.head_unit,
                             settings.round_to, settings.allocation, settings.split)

    if model is None:  # FSDP: the main process holds the trained model and writes the run
        return leave_to_main(accelerator)
    kept = masks.kept_summary(before)
    ratio = achieved_ratio(before, masks, layers, units)
    cut(model, masks)
    if settings.recover_steps:
        teacher = teacher_bytes = None
        if distill.enabled:  # the unpruned source, loaded a second time: the memory LoRAPrune's teacher saves
            source, _ = load_model(model_spec, dtype=options.dtype, device=str(next(model.parameters()).device),
                                   quant=options.quant)
            teacher = ModelTeacher(source)
            teacher_bytes = sum(t.numel() * t.element_size() for t in (*source.parameters(), *source.buffers()))
        torch.manual_seed(settings.seed)  # the adapter's initialisation depends on the seed alone
        model = add_lora(model, options.lora)
        recovery = TrainSettings(**{**asdict(training), "steps": settings.recover_steps})
        run = train(model, blocks, mask, recovery, accelerator=accelerator, checkpoint_dir=checkpoints,
                    resume=options.resume, progress=options.progress, log=quiet_log, teacher=teacher, distill=distill)
        if run.distill:
            run.distill |= {"teacher": "source", "teacher_model_bytes": teacher_bytes}
        record_training = {"training": run.record(recovery)}
        del teacher
        model = run.model
        if model is None:
            return leave_to_main(accelerator)
    after = Structure.of(model)
    params_after = count_parameters(model) | {"prunable": after.prunable_params(layers, units)}
    if evaluation.data and is_main:
        results["perplexity_after"] = evaluation.measure(model, tokenizer, "after", options.progress, quiet_log)

    record = provenance(
        "prune",
        source_model=model_spec,
        method=settings.method,
        settings=asdict(settings, dict_factory=_without_method_groups) | {"layers": layers, "dtype": options.dtype, "quant": options.quant}
        | ({"lora": asdict(options.lora)} if trains else {})
        | ({"loraprune": asdict(settings.loraprune)} if settings.method == "loraprune" else {})
        | ({"distill": asdict(distill)} if trains else {}),
        prunable=describe_prunable(before, layers, units),
        parameters={"before": params_before, "after": params_after,
                    "ratio_target": settings.ratio, "ratio_achieved": ratio},
        kept=kept,
        results=results,
        **record_training,
    )
    accelerator.wait_for_everyone()
    if is_main:
        with run_directory(out, options.overwrite) as tmp:
            model, saved_as = save_model(model, tokenizer, tmp)
            record["architecture"] = {"source": before.model_type, "saved_as": saved_as,
                                      "stock_loadable": after.uniform,
                                      "layer_shapes": [asdict(s) for s in after.layers],
                                      "source_layer_shapes": [asdict(s) for s in before.layers],
                                      "source_hidden": before.hidden}
            record["elapsed_seconds"] = round(time.perf_counter() - started, 1)
            save_scores(extra_file(tmp, SCORES_FILE), scores)
            write_json(tmp / "prunetune.json", record)
            write_report(tmp)  # from the JSON just written, exactly as `prunetune report` redraws it
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return record

