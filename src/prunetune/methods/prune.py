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

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data import load_blocks, load_examples
from ..models import check_positions
from ..training.distill import DistillSettings, model_teacher, self_held, self_teacher_for
from ..errors import SettingError
from ..families import family_of, refuse_experts
from ..importance import CRITERIA
from ..training.lora import LoraSettings, add_lora
from ..structure.scores import SCORES_FILE, save_scores
from ..importance.sharded import SHARDED_CRITERIA
from ..training.sharding import is_fsdp
from ..structure.allocate import (
    ALLOCATIONS,
    DEFAULT_ROUND_TO,
    DEFAULT_SPLIT,
    EXPERT_KINDS,
    LAYER_UNIT,
    SPLITS,
    achieved_ratio,
    check_ratio,
    describe_prunable,
    parse_layers,
    parse_round_to,
    parse_units,
    select_masks,
)
from ..structure.depth import counted_units, width_units
from ..structure.masks import Masks
from ..structure.experts import count_routing, routing_on
from .depth_width import select_with_depth
from .expert_budget import select_with_experts
from ..structure.surgery import cut
from ..structure.units import HEAD_UNITS, Structure, count_parameters
from ..runs.lifecycle import Run
from ..runs.settings import EvalSettings, RunOptions
from ..training.loop import TrainSettings
from ..training.rates import LORA_LR
from .loraprune.pruner import LoRAPruneSettings, LoRAPruner

METHODS = ("loraprune", *CRITERIA)
NEEDS_CALIBRATION = ("taylor", "wanda-sp", "lora-guided")


@dataclass
class PruneSettings:
    method: str = "loraprune"  # prunetune's best method (README's quality table)
    ratio: float = 0.2
    layers: str | None = None  # None: 'paper' for loraprune (the official choice), 'all' otherwise
    units: str | None = None  # None: the family's (Family.default_units), decided when the config is read
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
    def trains(self) -> bool:
        """LoRAPrune trains while it prunes; a one-shot method only with recovery steps."""
        return self.method == "loraprune" or self.recover_steps > 0

    @property
    def layer_spec(self) -> str:
        return self.layers or ("paper" if self.method == "loraprune" else "all")

    def check(self) -> None:
        """Every check of these settings alone (the layers need the model's config: parse_layers)."""
        if self.method not in METHODS:
            raise SettingError("PruneSettings.method", f"unknown PruneSettings.method '{self.method}'; available: "
                               f"{', '.join(METHODS)}")
        check_ratio(self.ratio)
        if self.units is not None:
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
            if self.method == "loraprune" and self.distill.cache:
                raise SettingError("DistillSettings.cache", "loraprune's teacher is the model itself with its masks "
                                   "off, which costs no memory: DistillSettings.cache is for a one-shot method's "
                                   "recovery (PruneSettings.recover_steps)")
            if self.method != "loraprune" and self.distill.teacher == "tuned":
                raise SettingError("DistillSettings.teacher", "DistillSettings.teacher tuned is LoRAPrune's (the "
                                   "unpruned model as it fine-tunes); a one-shot method's recovery distils from the "
                                   "source model: leave DistillSettings.teacher at base")


def _calibrates(settings: PruneSettings) -> bool:
    """Whether the prune reads its data: to train, to calibrate a criterion, to score whole layers or to
    count which experts are routed to (its units decided)."""
    kinds = parse_units(settings.units)
    return (settings.trains or settings.method in NEEDS_CALIBRATION or LAYER_UNIT in kinds
            or any(kind in EXPERT_KINDS for kind in kinds))


def _check_data(config, settings: PruneSettings, seq_len: int) -> None:
    """The data a calibrating prune reads, and its sequence length against the model's positions:
    before the weights load, so a mistake costs seconds."""
    if _calibrates(settings):
        load_examples(settings.data, default_split="train")
        check_positions(config, {"TrainSettings.seq_len": seq_len})


def _check_family(config, settings: PruneSettings, command: str = "prune") -> None:
    """A family whose layers must keep one shape (Phi-3, the mixtures of experts) prunes every layer alike:
    its default layers are all of them, and settings that would leave layers of different shapes are
    refused before loading. A mixture of experts prunes experts and their channels, not MLP channels."""
    family = family_of(config)
    if settings.units is None:
        settings.units = family.default_units
    kinds = parse_units(settings.units)
    if family.moe is not None:
        if command != "prune":
            refuse_experts(config, command)
        if "channels" in kinds:
            raise SettingError("PruneSettings.units", f"{family.name}'s MLP is a mixture of experts: its units are "
                               "experts and expert-channels, not channels (e.g. heads,experts,expert-channels)")
        if family.no_head_cut and "heads" in kinds:
            raise SettingError("PruneSettings.units", f"{family.name}'s heads cannot be pruned ({family.no_head_cut}); "
                               "prune experts,expert-channels")
        if LAYER_UNIT in kinds and len(kinds) > 1:
            raise SettingError("PruneSettings.units", "PruneSettings.units layers prunes a mixture of experts alone; "
                               "combine heads, experts and expert-channels instead, or prune layers by themselves")
    elif any(kind in EXPERT_KINDS for kind in kinds):
        raise SettingError("PruneSettings.units", f"{family.name} has no experts: PruneSettings.units experts and "
                           "expert-channels are for a mixture of experts "
                           "(Mixtral, Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE)")
    if not family.uniform_only:
        return
    if settings.layers is None:
        settings.layers = "all"
    if settings.layer_spec != "all" or settings.allocation != "uniform":
        setting = "PruneSettings.layers" if settings.layer_spec != "all" else "PruneSettings.allocation"
        raise SettingError(setting, f"{family.name} needs every layer pruned alike ({family.uniform_only}): set "
                           "PruneSettings.layers to all and PruneSettings.allocation to uniform")


def _lora_for(config, settings: PruneSettings, options: RunOptions) -> LoraSettings:
    """The adapter's settings, dropout decided: LoRAPrune's adapter on a mixture covers the experts too
    (its scores of experts and their channels come from it), where PEFT applies no dropout."""
    return options.lora.resolved(experts=family_of(config).moe is not None and settings.method == "loraprune")


def _without_method_groups(items) -> dict:
    """asdict's factory that leaves out the nested settings; the record adds those that apply."""
    return {k: v for k, v in items if k not in ("loraprune", "distill")}


def _check_sharding(run: Run, kinds) -> None:
    """What FSDP cannot do: choose experts or whole layers, which needs every layer in one process."""
    if is_fsdp(run.accelerator) and run.config is not None and family_of(run.config).moe is not None:
        raise SettingError("PruneSettings.units", "a mixture of experts is pruned in one process; run it without "
                           "FSDP (one-shot pruning needs no sharding to fit: it trains nothing)")
    if LAYER_UNIT in kinds and is_fsdp(run.accelerator):
        raise SettingError("PruneSettings.units", "PruneSettings.units layers chooses whole layers in one process; "
                           "run it without FSDP, or prune heads and channels only under FSDP")


@dataclass
class _Inputs:
    """What every stage of a prune reads: the source, the settings, its structure, the layers and units
    pruned, the adapter's settings and the (training or calibration) blocks with their mask."""
    model_spec: str
    settings: PruneSettings
    before: Structure
    layers: list[int]
    kinds: tuple
    lora: LoraSettings
    blocks: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class _Chosen:
    """What a method chose: the masks, the scores behind them, and what its record adds."""
    model: object  # None on an FSDP process other than the main one
    masks: Masks | None
    scores: object
    depth: dict | None = None
    experts: dict | None = None  # routing counts and the budget among experts
    training: dict = field(default_factory=dict)  # {"training": ...} where the model trained


def _prune_while_training(run: Run, model, given: _Inputs) -> _Chosen:
    """LoRAPrune: train the adapter, scoring units from it and masking progressively."""
    settings, distill, before = given.settings, given.settings.distill, given.before
    torch.manual_seed(settings.seed)  # the adapter's initialisation depends on the seed alone
    mixture = family_of(model).moe is not None
    model = add_lora(model, given.lora, experts=mixture)
    pruner = LoRAPruner(model, before, ratio=settings.ratio, layers=given.layers, units=given.kinds,
                        head_unit=settings.head_unit, round_to=settings.round_to, allocation=settings.allocation,
                        settings=settings.loraprune, total_steps=run.options.training.steps, split=settings.split)
    teacher = self_teacher_for(model, pruner.masks_off, distill) if distill.enabled else None
    with count_routing(model, with_grad_only=True) as routing:  # not the self-teacher's passes
        trained = run.train(model, given.blocks, given.mask, hooks=pruner, teacher=teacher, distill=distill)
    if trained.distill:
        trained.distill |= self_held(given.model_spec, adapters=distill.teacher == "tuned")
    masks = pruner.finish()
    experts = None
    if mixture:  # numbered as in the source model; a removed expert stops being picked
        experts = {"routing": {"pruning": routing.summed(run.accelerator).record(before.top_k)},
                   **({"budget": pruner.experts} if pruner.experts else {})}
    # under FSDP the trained model is gathered on the main process, None on the others
    return _Chosen(trained.model, masks, pruner.average, pruner.depth, experts,
                   {"training": trained.record(run.options.training) | {"schedule": pruner.history}})


def _score_once(run: Run, model, given: _Inputs) -> _Chosen:
    """A one-shot criterion: score every unit once (from calibration batches where it needs them), then
    choose the masks, sharing the budget with experts or whole layers where those are units."""
    settings, before, kinds = given.settings, given.before, given.kinds
    experts = any(kind in EXPERT_KINDS for kind in kinds)
    batches = None
    if settings.method in NEEDS_CALIBRATION or LAYER_UNIT in kinds or experts:
        calib = given.blocks[: settings.calib_samples].to(run.accelerator.device)
        batches = list(calib.split(run.options.training.batch_size))
    if is_fsdp(run.accelerator) and settings.method in SHARDED_CRITERIA:  # each process scores its own rows
        scores, model = SHARDED_CRITERIA[settings.method](model, batches)
    else:
        scores = CRITERIA[settings.method](model, batches, seed=settings.seed)
    ratio, layers = settings.ratio, given.layers
    if experts:
        routing = routing_on(model, batches)
        masks, budget = select_with_experts(model, before, scores, routing, batches, ratio, layers, kinds,
                                            settings.head_unit, settings.round_to, settings.allocation,
                                            settings.split, log=run.log)
        return _Chosen(model, masks, scores,
                       experts={"routing": {"calibration": routing.record(before.top_k)}, "budget": budget})
    if LAYER_UNIT in kinds:
        masks, depth = select_with_depth(model, before, scores, batches, ratio, layers, width_units(kinds),
                                         settings.head_unit, settings.round_to, settings.allocation, settings.split,
                                         log=run.log)
        return _Chosen(model, masks, scores, depth=depth)
    masks = select_masks(before, scores, ratio, layers, counted_units(kinds), settings.head_unit, settings.round_to,
                         settings.allocation, settings.split)
    return _Chosen(model, masks, scores)


def _recover(run: Run, model, given: _Inputs, chosen: _Chosen, options: RunOptions):
    """A one-shot prune's recovery: a LoRA trained on the cut model, distilled from the source where
    asked. Adds the training (and the cut model's routing) to `chosen`; returns the trained model."""
    settings, distill = given.settings, given.settings.distill
    training = run.options.training
    teacher, held = None, {}
    if distill.enabled:  # the unpruned source, loaded a second time or cached: what LoRAPrune's teacher saves
        teacher, held = model_teacher(given.model_spec, distill, given.blocks, dtype=options.dtype,
                                      quant=options.quant, accelerator=run.accelerator, seq_len=training.seq_len,
                                      batch_size=training.batch_size, log=run.log)
    torch.manual_seed(settings.seed)  # the adapter's initialisation depends on the seed alone
    model = add_lora(model, given.lora)
    recovery = TrainSettings(**{**asdict(training), "steps": settings.recover_steps})
    with count_routing(model) as routing:
        trained = run.train(model, given.blocks, given.mask, recovery, teacher=teacher, distill=distill)
    if chosen.experts is not None:  # the cut model's experts, numbered as they now are
        chosen.experts["routing"]["training"] = routing.summed(run.accelerator).record(given.before.top_k)
    if trained.distill:
        trained.distill |= held
    chosen.training = {"training": trained.record(recovery)}
    return trained.model


def prune(model_spec: str, out: Path, settings: PruneSettings, evaluation: EvalSettings,
          options: RunOptions | None = None, log: Callable[[str], None] = print, *, command: str = "prune",
          annotate: Callable[[dict], dict] | None = None) -> dict:
    """Prune `model_spec` and save the smaller model in `out`; returns prunetune.json's record.
    A method that builds on this pipeline (LoRAM) names its `command` and adds its own record fields
    with `annotate(fields) -> more fields`."""
    options = options or RunOptions()
    training = options.training
    settings.distill = settings.distill.resolved(settings.method)
    distill = settings.distill
    run = Run(command, out, options, evaluation, log=log, model=model_spec, checks=[settings.check], lr=LORA_LR,
              config_checks=[lambda config: _check_family(config, settings, command),  # decides the units
                             lambda config: _lora_for(config, settings, options),
                             lambda config: parse_layers(settings.layer_spec, int(config.num_hidden_layers),
                                                         "PruneSettings.layers"),
                             lambda config: _check_data(config, settings, training.seq_len)])
    training = run.options.training  # its learning rate decided
    kinds = parse_units(settings.units)
    calibrates = _calibrates(settings)
    _check_sharding(run, kinds)
    model, tokenizer = run.load(model_spec, quant=options.quant, seq_lens=[training.seq_len] if calibrates else [])
    lora = _lora_for(model.config, settings, options)
    before = Structure.of(model)
    layers = parse_layers(settings.layer_spec, before.num_layers)
    units = counted_units(kinds)  # a whole layer counts every projection
    params_before = count_parameters(model) | {"prunable": before.prunable_params(layers, units)}
    run.perplexity(model, tokenizer, "before")

    blocks = mask = None
    if calibrates:
        blocks, mask = load_blocks(settings.data, tokenizer, training.seq_len, default_split="train")
    given = _Inputs(model_spec, settings, before, layers, kinds, lora, blocks, mask)
    chosen = (_prune_while_training if settings.method == "loraprune" else _score_once)(run, model, given)
    model = chosen.model
    if model is None:  # FSDP: the main process holds the trained model and writes the run
        return run.leave()
    masks = chosen.masks
    kept = masks.kept_summary(before)
    ratio = achieved_ratio(before, masks, layers, units)
    cut(model, masks)
    if settings.recover_steps:
        model = _recover(run, model, given, chosen, options)
        if model is None:
            return run.leave()
    after = Structure.of(model)
    survivors = [i for i in range(before.num_layers) if masks.layer_kept(i)]  # old index -> new: its position
    params_after = count_parameters(model) | {
        "prunable": after.prunable_params([survivors.index(i) for i in layers if i in survivors], units)}
    run.perplexity(model, tokenizer, "after")
    fields = dict(
        source_model=model_spec,
        method=settings.method,
        settings=asdict(settings, dict_factory=_without_method_groups)
        | {"layers": layers, "dtype": options.dtype, "quant": options.quant}
        | ({"lora": asdict(lora)} if settings.trains else {})
        | ({"loraprune": asdict(settings.loraprune)} if settings.method == "loraprune" else {})
        | ({"distill": asdict(distill)} if settings.trains else {}),
        prunable=describe_prunable(before, layers, units),
        parameters={"before": params_before, "after": params_after,
                    "ratio_target": settings.ratio, "ratio_achieved": ratio},
        kept=kept,
        **chosen.training,
        **({"depth": chosen.depth} if chosen.depth is not None else {}),
        **({"experts": chosen.experts} if chosen.experts is not None else {}),
    )
    if annotate is not None:
        fields |= annotate(fields)
    return run.finish(model, tokenizer, source_structure=before,
                      extras={SCORES_FILE: lambda path: save_scores(path, chosen.scores)}, **fields)
