"""Sheared-LLaMA's targeted structured pruning (Xia et al., ICLR 2024).

    load -> hard-concrete masks for the target shape (structure/l0_masks.py) -> train the model
    (all weights, or LoRA) and the mask logits by descent and the Lagrange multipliers by ascent,
    drawing batches from several domains (fixed mixture or dynamic batch loading) -> deterministic
    masks with exactly the target counts -> fold their values into the weights -> cut -> save

The result has exactly the target shape and loads with stock `from_pretrained`; continue training it
with `prunetune train` (methods/sheared/continued.py). Learning rates are the official code's: 1.0 for the
mask logits and the multipliers, the model's own (1e-4 there) for the weights.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import SettingError
from ...families import family_of, prepare, refuse_experts
from ...models import check_architecture
from .l0_masks import ShearMasks
from ...structure.surgery import cut, merge_lora
from .target import Target, parse_target, quick_source, target_parameters
from ...structure.units import Structure, count_parameters
from ...training.distill import DistillSettings, SelfTeacher, model_teacher, self_held
from ...training.loop import ComposedHooks, TrainHooks
from ...training.rates import FULL_LR
from .mask_init import MASK_INITS, mask_priorities
from .domain_training import DomainSettings, domain_perplexities, model_losses, prepare_domains, trainable
from ...runs.lifecycle import Run
from ...runs.settings import EvalSettings, RunOptions


@dataclass
class ShearSettings:
    target: str = ""
    # Learning rate of the mask logits. None: 1.0 (the official code's) from the uniform start, 0.1
    # from an importance start, which already holds a choice worth keeping (docs/methods/sheared.md).
    mask_lr: float | None = None
    lambda_lr: float = 1.0  # ... and of the Lagrange multipliers (gradient ascent)
    # λ2's starting value, the quadratic term's stiffness. The official code starts both multipliers
    # at 0, which suits its 3,200 steps; in runs of a few hundred steps λ1 then winds up while the
    # masks trail the warm-up and overshoots by 5-9% of the parameters. A stiff start keeps the masks
    # on the warming target (benchmarks/sheared.py and the README have the measurements).
    lambda2_init: float = 5000.0
    # Share of the steps over which the target sparsity warms up. None: 0.2 (official: 640 of 3200) from
    # the uniform start; 0 from an importance start, whose masks then start at the target.
    warmup: float | None = None
    lora: bool = False  # train a LoRA instead of every weight (memory), merged before the cut
    # Where the mask logits start: "uniform" is the paper's tie (every log α at the clamp, ties kept by
    # index); a criterion orders them by importance and breaks final ties by its scores (mask_init.py).
    mask_init: str = "taylor"
    init_samples: int = 16  # calibration sequences for mask_init, spread over the training domains
    # Distillation from the source model: with LoRA the model itself with masks and adapters off (no
    # memory), otherwise a second copy. None fields take the method's default (training/distill.py).
    distill: DistillSettings = field(default_factory=DistillSettings)

    def resolved(self) -> "ShearSettings":
        """These settings with the defaults that depend on the start filled in."""
        importance = self.mask_init != "uniform"
        return dataclasses.replace(
            self, mask_lr=self.mask_lr if self.mask_lr is not None else (0.1 if importance else 1.0),
            warmup=self.warmup if self.warmup is not None else (0.0 if importance else 0.2))

    def check(self) -> None:
        if not self.target.strip():
            raise SettingError("ShearSettings.target", "ShearSettings.target is required, e.g. layers=24,hidden=2048,"
                               "heads=16,kv-heads=16,intermediate=5504 or the config.json of a smaller model")
        for name in ("mask_lr", "lambda_lr") if self.mask_lr is not None else ("lambda_lr",):
            if getattr(self, name) <= 0:
                raise SettingError(f"ShearSettings.{name}",
                                   f"ShearSettings.{name} must be positive, got {getattr(self, name)}")
        if self.lambda2_init < 0:
            raise SettingError("ShearSettings.lambda2_init", "ShearSettings.lambda2_init must be at least 0 (0 is "
                               f"the official start), got {self.lambda2_init}")
        if self.warmup is not None and not 0 <= self.warmup <= 1:
            raise SettingError("ShearSettings.warmup",
                               f"ShearSettings.warmup is a share of the steps in [0, 1], got {self.warmup}")
        if self.mask_init not in MASK_INITS:
            raise SettingError("ShearSettings.mask_init", f"unknown ShearSettings.mask_init '{self.mask_init}'; "
                               f"use one of {', '.join(MASK_INITS)}")
        if self.init_samples < 1:
            raise SettingError("ShearSettings.init_samples",
                               f"ShearSettings.init_samples must be at least 1, got {self.init_samples}")
        self.distill.check_model_teacher("shearing")
        if self.lora and self.distill.cache:
            raise SettingError("DistillSettings.cache", "with ShearSettings.lora the teacher is the model itself, "
                               "masks and adapters off, which costs no memory: leave DistillSettings.cache unset")


def source_structure(config) -> Structure:
    """The source model's shapes from its config alone (weights on the meta device), so a bad target
    fails before the model loads."""
    from transformers import AutoModelForCausalLM

    check_architecture(config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return Structure.of(prepare(meta))


class ShearHooks(TrainHooks):
    """The masks' side of the training loop: the Lagrangian joins the loss, the mask logits descend
    and the multipliers ascend after every optimizer step of the model."""

    def __init__(self, masks: ShearMasks, settings: ShearSettings):
        self.masks = masks
        settings = settings.resolved()
        self.mask_optimizer = torch.optim.AdamW(masks.mask_parameters(), lr=settings.mask_lr, weight_decay=0.0)
        self.lambda_optimizer = torch.optim.AdamW(masks.lagrangian_parameters(), lr=settings.lambda_lr,
                                                  weight_decay=0.0, maximize=True)
        self.info: dict = {}

    def extra_loss(self, step: int) -> torch.Tensor:
        loss, self.info = self.masks.lagrangian(step)
        self.info = self.info | {"lagrangian": float(loss.detach())}
        return loss

    def before_optimizer_step(self, step: int) -> None:
        # The masks live outside the DDP- or FSDP-wrapped model, so their gradients are averaged here.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.masks.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world

    def after_optimizer_step(self, step: int) -> None:
        for optimizer in (self.mask_optimizer, self.lambda_optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def log_entry(self, step: int) -> dict:
        sizes = {f"full_{kind}": mask.size for kind, mask in self.masks.distributions.items()}
        return {"masks": {k: round(float(v), 6) for k, v in self.info.items()} | sizes}

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "mask_optimizer": self.mask_optimizer.state_dict(),
                "lambda_optimizer": self.lambda_optimizer.state_dict(), "mask_rng": self.masks.rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.lambda_optimizer.load_state_dict(state["lambda_optimizer"])
        if "mask_rng" in state:  # checkpoints from before the masks had their own generator lack it
            self.masks.set_rng_state(state["mask_rng"])


def _check_shape(model: nn.Module, target: Target) -> Structure:
    after = Structure.of(model)
    got = (after.hidden, [(s.num_heads, s.num_kv_heads, s.intermediate) for s in after.layers])
    want = (target.hidden, target.layer_shapes())
    if got != want:  # a bug, not a user error: the masks must keep exact counts
        raise RuntimeError(f"the cut model has shape {got}, not the target {want}")
    return after


def shear(model_spec: str, out: Path, settings: ShearSettings, domain_settings: DomainSettings,
          evaluation: EvalSettings, options: RunOptions | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Prune `model_spec` to the target shape with learned masks; returns prunetune.json's record."""
    options = options or RunOptions()
    training = options.training
    domains = None

    def check_settings() -> None:
        nonlocal domains
        settings.check()
        domains = domain_settings.check()
        if options.quant:
            raise SettingError("RunOptions.quant", "shearing trains the mask logits through every weight; "
                               "RunOptions.quant is not supported here (use ShearSettings.lora to save memory)")
        quick = quick_source(model_spec)  # a GGUF source's sizes from its header: its whole config takes seconds
        if quick is not None:
            parse_target(settings.target, quick)

    # every domain's held-out perplexity is measured at the end, at the evaluation's length
    before = target = None

    def check_target(config) -> None:  # every target error before the model loads
        nonlocal before, target
        refuse_experts(config, "Sheared-LLaMA's shear")
        before = source_structure(config)
        target = parse_target(settings.target, before)
        family = family_of(config)
        if target.hidden != before.hidden and family.no_hidden_cut:
            raise SettingError("ShearSettings.target", f"{family.name}'s hidden size cannot be pruned: "
                               f"{family.no_hidden_cut}")

    run = Run("shear", out, options, evaluation, log=log, checks=[check_settings], config_checks=[check_target],
              model=model_spec, lr=FULL_LR,
              seq_lens={"TrainSettings.seq_len": training.seq_len, "EvalSettings.seq_len": evaluation.seq_len})
    training = run.options.training  # its learning rate decided
    model, tokenizer = run.load(model_spec, seq_lens=[training.seq_len, evaluation.seq_len])
    params_before = count_parameters(model)
    goal = target_parameters(target, before)
    run.log(f"target {target.describe()}: {goal:,} parameters (source {params_before['total']:,}); "
            f"head unit {target.head_unit}")
    run.perplexity(model, tokenizer, "before")
    run_domains = prepare_domains(model, tokenizer, domain_settings, domains, training, run.accelerator,
                                  target_parameters=goal, source_losses=model_losses(model, training.batch_size))
    run.log("reference losses (" + run_domains.reference_source + "): "
            + ", ".join(f"{k} {v:.3f}" for k, v in run_domains.references.items()))

    settings = settings.resolved()
    masks = ShearMasks(before, target, warmup_steps=round(settings.warmup * training.steps),
                       lambda2_init=settings.lambda2_init, seed=training.seed)
    if settings.mask_init != "uniform":
        masks.init_from(mask_priorities(model, masks, settings.mask_init, run_domains.blocks,
                                        settings.init_samples, training.batch_size, training.seed))
        run.log(f"mask logits start from {settings.mask_init} scores ({settings.init_samples} sequences)")
    masks.to(run.accelerator.device)
    model = trainable(model, options.lora if settings.lora else None, training.seed)
    handle = masks.attach(model)
    distill = settings.distill.resolved("sheared")
    teacher, held = None, {}
    if distill.enabled and settings.lora:  # the source itself: masks suspended, adapters off
        teacher, held = SelfTeacher(model, handle.suspended, adapters=False), self_held(model_spec, adapters=False)
    elif distill.enabled:
        teacher, held = model_teacher(model_spec, distill, run_domains.blocks, dtype=options.dtype,
                                      accelerator=run.accelerator, seq_len=training.seq_len,
                                      batch_size=training.batch_size, log=run.log)
    trained = run.train(model, run_domains.blocks, run_domains.loss_mask,
                        hooks=ComposedHooks(ShearHooks(masks, settings), run_domains.hook), sampler=run_domains.sampler,
                        teacher=teacher, distill=distill)
    if trained.distill:
        trained.distill |= held
    del teacher

    # A probe sequence checks that the cut model computes what the masked one did (eval mode: the
    # deterministic gates final() returns); the difference is recorded. Under FSDP every process runs
    # the probe (the forward gathers each layer), and the masks are the same in every process.
    probe = run_domains.blocks[:1, : min(32, training.seq_len)].to(run.accelerator.device)
    with torch.no_grad():
        expected = float(masks.expected_parameters())
        final_masks, values = masks.final()
        masked_logits = model(input_ids=probe).logits.float()
    handle.remove()
    if trained.model is None:  # FSDP: the main process holds the gathered model, folds, cuts and saves it
        return run.leave()
    model = merge_lora(trained.model)
    masks.fold_into(model, values)
    kept = final_masks.kept_summary(before)
    cut(model, final_masks)
    _check_shape(model, target)
    with torch.no_grad():
        logit_diff = float((model(input_ids=probe).logits.float() - masked_logits).abs().max())
    params_after = count_parameters(model)
    run.log(f"cut to {target.describe()}: {params_after['total']:,} parameters; the masks expected "
            f"{expected:,.0f} ({(expected - params_after['total']) / params_after['total']:+.2%})")
    run.perplexity(model, tokenizer, "after")
    if run.is_main:
        run.results["domain_perplexity"] = domain_perplexities(model, tokenizer, domains, evaluation.seq_len,
                                                               evaluation.max_windows, options.progress)
    return run.finish(
        model, tokenizer, source_structure=before,
        source_model=model_spec,
        method="sheared",
        settings=asdict(settings) | {"distill": asdict(distill), "dtype": options.dtype}
        | ({"lora": asdict(options.lora.resolved())} if settings.lora else {}),
        target=asdict(target) | {"spec": target.describe()},
        parameters={"before": params_before, "after": params_after, "target": goal,
                    "expected_by_masks": round(expected),
                    "expected_error": (expected - params_after["total"]) / params_after["total"]},
        kept=kept,
        checks={"masked_vs_cut_max_abs_logit_diff": logit_diff},
        data=asdict(domain_settings) | run_domains.record(),
        training=trained.record(training),
    )
