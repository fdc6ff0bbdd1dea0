"""The CLI's side of the settings: which flag sets each setting, and the spellings that were renamed.

Core code names settings in its errors as `Class.field` (errors.SettingError); `as_flags` words
such a message with the flags the user typed ("ShearSettings.warmup is a share of the steps ..."
becomes "--warmup-share is a share of the steps ..."). SETTING_FLAGS is the one table that maps
them; tests/cli/test_cli_flags.py checks that every setting a check names is in it.

RENAMED lists the spellings that keep working for one release: each prints one `warning:` line on
stderr and is read as its new form (CHANGELOG.md, "Renamed flags").
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

SETTING_FLAGS = {
    # runs/settings.py
    "EvalSettings.data": "--eval-data",
    "EvalSettings.seq_len": "--eval-seq-len",
    "EvalSettings.max_windows": "--max-windows",
    **{f"RunOptions.{name}": f"--{name}" for name in ("dtype", "device", "quant", "overwrite", "resume")},
    # training/
    **{f"TrainSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup", "max_grad_norm", "gradient_checkpointing",
        "checkpoint_every", "seed")},
    "LoraSettings.r": "--lora-r",
    "LoraSettings.alpha": "--lora-alpha",
    "LoraSettings.dropout": "--lora-dropout",
    "LoraSettings.dtype": "--lora-dtype",
    "DistillSettings.enabled": "--distill",
    "DistillSettings.temperature": "--distill-temperature",
    "DistillSettings.alpha": "--distill-alpha",
    "DistillSettings.teacher": "--teacher",
    "DistillSettings.cache": "--teacher-cache",
    "DistillSettings.top_k": "--teacher-top-k",
    # methods/prune.py, methods/loraprune/
    **{f"PruneSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "method", "ratio", "layers", "units", "head_unit", "round_to", "allocation", "split", "data",
        "calib_samples", "recover_steps", "seed")},
    "LoRAPruneSettings.prune_every": "--prune-every",
    "LoRAPruneSettings.ema": "--ema",
    "LoRAPruneSettings.score": "--score",
    "LoRAPruneSettings.normalize": "--normalize",
    "LoRAPruneSettings.warmup": "--prune-warmup",
    "LoRAPruneSettings.cooldown": "--prune-cooldown",
    **{f"AgreeSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "ratios", "batches", "batch_size", "seq_len", "data", "layers", "units", "head_unit", "round_to", "steps",
        "lr", "lora_r", "lora_alpha", "score", "normalize", "seed")},
    # methods/sheared/
    "ShearSettings.target": "--target",
    "ShearSettings.mask_lr": "--mask-lr",
    "ShearSettings.lambda_lr": "--lambda-lr",
    "ShearSettings.lambda2_init": "--lambda2-init",
    "ShearSettings.warmup": "--warmup-share",
    "ShearSettings.lora": "--lora",
    "ShearSettings.mask_init": "--mask-init",
    "ShearSettings.init_samples": "--init-samples",
    **{f"DomainSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "data", "weights", "references", "eval_every", "eval_blocks", "eta", "clamp")},
    "DomainSettings.dynamic": "--dynamic-loading",
    "ContinueSettings.lora": "--lora",
    "ContinueSettings.reference_model": "--reference-model",
    "ContinueSettings.teacher": "--teacher",
    # methods/loram/
    **{f"LoramPruneSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "method", "ratio", "criterion", "layers", "data", "calib_samples", "seq_len", "seed")},
    **{f"LoramRunSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "ratio", "method", "criterion", "layers", "align_data", "align_steps", "align_lr", "align_distill", "data",
        "ood_data", "steps", "lr", "batch_size", "seq_len", "quant", "gradient_checkpointing", "baseline",
        "ablation", "eval_seq_len", "max_windows", "seed")},
    # plan/, bench/
    **{f"PlanSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "method", "ratio", "quant", "batch_size", "seq_len", "gradient_checkpointing", "processes", "fsdp", "dtype",
        "lora_r", "lora_dtype", "distill", "layers")},
    **{f"SpeedSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "prompt_len", "decode_tokens", "batch_size", "repeats", "dtype", "device", "seed")},
    "SpeedSettings.warmup": "--warmup-runs",
    "SpeedSettings.lora": "--adapter",
    **{f"BenchSettings.{name}": f"--{name.replace('_', '-')}" for name in (
        "shape", "model", "batch_size", "seq_len", "repeats", "dtype", "device", "gradient_checkpointing",
        "variants")},
    "BenchSettings.warmup": "--warmup-runs",
}

# Settings a command-line user cannot set (no flag, or an argument): their names stay as they are.
NO_FLAG = {"DomainSettings.smoothing", "TrainSettings.weight_decay", "SpeedSettings.models", "BenchSettings.seed"}

_SETTING = re.compile(r"\b[A-Z][A-Za-z]*(?:Settings|Options)\.[a-z][a-z0-9_]*\b")


def as_flags(message: str) -> str:
    """A core message with every setting it names replaced by the flag that sets it."""
    return _SETTING.sub(lambda m: SETTING_FLAGS.get(m.group(0), m.group(0)), message)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Renamed spellings, accepted for one release


@dataclass(frozen=True)
class Renamed:
    """`old` on `command` now reads `new`. A former switch (`switch_value`) becomes `new VALUE`; when
    `old` is also the new option's own name, only its switch form (no value after it) is old."""

    command: str
    old: str
    new: str
    switch_value: str | None = None

    @property
    def replacement(self) -> str:
        return f"{self.new} {self.switch_value}" if self.switch_value else self.new


RENAMED = (
    Renamed("eval", "--lora", "--adapter"),
    Renamed("bench", "--lora", "--adapter"),
    Renamed("bench", "--warmup", "--warmup-runs"),
    Renamed("bench-criterion", "--warmup", "--warmup-runs"),
    Renamed("masks-agree", "--normalize", "--normalize", "module"),
    Renamed("masks-agree", "--no-normalize", "--normalize", "none"),
)


def renamed_for(command: str) -> tuple[Renamed, ...]:
    return tuple(r for r in RENAMED if r.command == command)


def rewrite(args: list[str], renamed: tuple[Renamed, ...]) -> list[str]:
    """`args` with every old spelling turned into its new form, one warning for each."""
    result: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # the rest are arguments, not options
            return result + args[i:]
        name, eq, value = arg.partition("=")
        rule = next((r for r in renamed if r.old == name), None)
        if rule is not None and rule.old == rule.new:  # a value after it: the new form
            following = value if eq else (args[i + 1] if i + 1 < len(args) else "-")
            if not following.startswith("-"):
                rule = None
        if rule is None:
            result.append(arg)
        elif rule.switch_value:
            warn(f"{rule.old} is deprecated; use {rule.replacement}")
            result += [rule.new, rule.switch_value]
        else:
            warn(f"{rule.old} is deprecated; use {rule.new}")
            result += [f"{rule.new}={value}"] if eq else [rule.new]
        i += 1
    return result


def deprecating_command(command: str):
    """The command class for `command`: it reads RENAMED's spellings before parsing its options."""
    from typer.core import TyperCommand

    rules = renamed_for(command)

    class Command(TyperCommand):
        def parse_args(self, ctx, args):
            return super().parse_args(ctx, rewrite(list(args), rules))

    return Command
