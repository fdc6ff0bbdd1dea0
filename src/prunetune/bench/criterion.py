"""Criterion benchmark: what one scoring step costs with vanilla Taylor and with LoRA-guided scores.

Three variants, each on the same model shape, batch and sequence length:

  taylor            the seven projection weights require grad (everything else frozen); a step is
                    forward + backward + the per-unit |W ⊙ ∂L/∂W| reduction of importance/taylor.py,
                    then the weight gradients are dropped. This is what LLM-Pruner's criterion needs.
  lora-guided       a LoRA (r 8, alpha 16, no dropout) on the seven projections, base frozen; a step
                    is forward + backward + `lora_guided_scores` (LoRAPrune), then the LoRA
                    gradients are dropped. The pretrained weights never get a gradient.
  lora-guided-8bit  the same on a bitsandbytes int8 base.

Models are randomly initialised from a named shape (`SHAPES`), built directly in the target dtype
on the target device, so a GPU measures a LLaMA-7B-sized step without downloading weights; or a
real model is loaded with `load_model`. One variant at a time; everything is freed in between.

A step runs in training mode (so gradient checkpointing, when asked for, applies; no variant has
dropout) and, on a GPU in bf16/fp16, its forward runs under autocast, as `prunetune.training.loop` runs its steps.

Memory:
  - CUDA: `torch.cuda.max_memory_allocated()` over the timed and untimed steps, after a peak reset
    that follows building (and quantizing) the model, so it includes the weights.
  - CPU: the variant runs in a fresh Python process (measure.run_isolated), with glibc's mmap
    threshold fixed so freed tensors leave the resident set; its peak resident set size (Linux
    VmHWM, reset through /proc/self/clear_refs once the model is built) minus its resident size
    before the model was built, i.e. weights plus what the steps
    need, without the Python/torch runtime. Where the reset is not possible the whole-process peak
    (`ru_maxrss`) is used and the table says so. CPU step times are for comparing the variants with
    each other, not with a GPU.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import SettingError, UserError
from ..training.loop import enable_checkpointing
from ..measure import (
    GIB,
    device_name,
    free,
    isolation_note,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    versions,
    weights_bytes,
    worker_main,
)
from .shapes import SHAPES, random_model, shape_config

VARIANTS = ("taylor", "lora-guided", "lora-guided-8bit")

# What the LoRA-guided criterion should achieve on a GPU (LLaMA-7B shape, bf16), relative to taylor.
TARGETS = {
    "lora-guided": {"max_memory_ratio": 0.45, "min_speedup": 1.5},
    "lora-guided-8bit": {"max_memory_ratio": 0.30},
}


@dataclass
class BenchSettings:
    shape: str = "llama-7b"
    model: str | None = None  # a model spec for load_model; replaces the random `shape`
    batch_size: int = 1
    seq_len: int = 1024
    warmup: int = 2
    repeats: int = 5
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    device: str = "auto"
    gradient_checkpointing: bool = False
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0

    def check(self) -> None:
        from ..models import pick_device, pick_dtype

        if self.model is None and self.shape not in SHAPES:
            raise UserError(f"unknown shape '{self.shape}'; available: {', '.join(SHAPES)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            what = f"unknown variant '{bad[0]}'" if bad else "no variant given"
            raise UserError(f"{what}; available: {', '.join(VARIANTS)}")
        for name, least in (("batch_size", 1), ("seq_len", 2), ("warmup", 0), ("repeats", 1)):
            if getattr(self, name) < least:
                raise SettingError(f"BenchSettings.{name}",
                                   f"BenchSettings.{name} must be at least {least}, got {getattr(self, name)}")
        pick_dtype(self.dtype, pick_device(self.device))

    @property
    def label(self) -> str:
        return self.model if self.model is not None else self.shape


@dataclass
class VariantResult:
    variant: str
    step_seconds: float | None = None  # median of the timed steps
    step_times: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    weights_bytes: int | None = None  # parameters and buffers (LoRA included)
    memory_measure: str = ""
    loss: float | None = None
    skipped: str | None = None  # why the variant did not run
    raw: dict = field(default_factory=dict)  # measure-specific extras (CPU RSS values)


@dataclass
class BenchResult:
    settings: BenchSettings
    device: str
    device_name: str
    dtype: str
    memory_measure: str
    variants: list[VariantResult]
    config: dict = field(default_factory=dict)

    def get(self, variant: str) -> VariantResult | None:
        return next((v for v in self.variants if v.variant == variant), None)

    def ratios(self, variant: str) -> dict:
        """Peak memory as a fraction of taylor's, and speed-up over taylor (taylor time / this time)."""
        base, this = self.get("taylor"), self.get(variant)
        if base is None or this is None or base.skipped or this.skipped:
            return {"memory_ratio": None, "speedup": None}
        return {"memory_ratio": this.peak_memory_bytes / base.peak_memory_bytes if base.peak_memory_bytes else None,
                "speedup": base.step_seconds / this.step_seconds if this.step_seconds else None}

    def targets(self) -> dict:
        """Each target of `TARGETS` with whether it is met (None where the variant did not run)."""
        checks = {}
        for variant, wanted in TARGETS.items():
            got = self.ratios(variant)
            for key, limit in wanted.items():
                value = got["memory_ratio"] if key == "max_memory_ratio" else got["speedup"]
                met = None if value is None else (value <= limit if key == "max_memory_ratio" else value >= limit)
                checks[f"{variant} {key}"] = {"limit": limit, "value": value, "met": met}
        return checks

    def to_dict(self) -> dict:
        return {
            "benchmark": "criterion",
            "settings": asdict(self.settings) | {"variants": list(self.settings.variants)},
            "device": self.device,
            "device_name": self.device_name,
            "dtype": self.dtype,
            "memory_measure": self.memory_measure,
            "config": self.config,
            "variants": [asdict(v) | self.ratios(v.variant) for v in self.variants],
            "targets": self.targets(),
            "versions": versions(),
        }


# ---------------------------------------------------------------------------------------------
# Building the model of one variant


def _preload(variant: str) -> None:
    """Import what building and stepping will import, so its memory is not counted as the model's."""
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from peft.tuners.lora import layer  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from ..importance import lora_guided  # noqa: F401
    from ..structure import scores  # noqa: F401

    if variant == "lora-guided-8bit":
        import bitsandbytes  # noqa: F401


def build_model(settings: BenchSettings, variant: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model of one variant, ready to step: gradients on W (taylor) or on a LoRA (the others)."""
    from ..training.lora import LoraSettings, add_lora
    from ..models import load_model, quantize_linear_layers
    from ..structure.units import PROJECTIONS, base_linear, decoder_layers, projection

    quantized = variant == "lora-guided-8bit"
    torch.manual_seed(settings.seed)  # the same random weights for every variant
    if settings.model is not None:
        model, _ = load_model(settings.model, dtype=str(dtype).removeprefix("torch."), device=str(device),
                              quant="8bit" if quantized else None)
    else:
        model = random_model(shape_config(settings.shape, settings.seq_len), device, dtype, settings.seed)
        if quantized:
            quantize_linear_layers(model, "8bit", dtype, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "taylor":
        for layer in decoder_layers(model):
            for name in PROJECTIONS:
                base_linear(projection(layer, name)).weight.requires_grad_(True)
    else:
        model = add_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0))
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()  # checkpointing only applies in training mode; no variant has dropout
    return model


# ---------------------------------------------------------------------------------------------
# One step of each variant


def taylor_step(model: nn.Module, batch: torch.Tensor, autocast=nullcontext) -> float:
    """Forward, backward, |W ⊙ ∂L/∂W| per unit (importance/taylor.py), drop the gradients.

    `taylor_scores` itself runs the model in eval mode, where transformers skips gradient
    checkpointing, so the step runs the pass here and reuses only the scoring.
    """
    from ..importance.taylor import scores_from_weight_gradients
    from ..structure.units import PROJECTIONS, base_linear, decoder_layers, projection

    with autocast():  # the forward only, as in prunetune.training.loop; scoring runs in full precision
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    with torch.no_grad():
        scores_from_weight_gradients(model)
    for layer in decoder_layers(model):
        for name in PROJECTIONS:
            base_linear(projection(layer, name)).weight.grad = None
    return loss.item()


def lora_guided_step(model: nn.Module, batch: torch.Tensor, autocast=nullcontext) -> float:
    """Forward, backward, LoRA-guided unit scores, drop the LoRA gradients."""
    from ..importance.lora_guided import lora_guided_scores

    with autocast():  # the forward only, as in prunetune.training.loop; scoring runs in full precision
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    lora_guided_scores(model)
    model.zero_grad(set_to_none=True)
    return loss.item()


STEPS: dict[str, Callable[..., float]] = {
    "taylor": taylor_step, "lora-guided": lora_guided_step, "lora-guided-8bit": lora_guided_step,
}


# ---------------------------------------------------------------------------------------------
# Running variants


def run_variant(settings: BenchSettings, variant: str) -> VariantResult:
    """Build one variant's model in this process, step it, measure, free it."""
    from ..models import pick_device, pick_dtype

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    cuda = device.type == "cuda"
    _preload(variant)
    free(device)
    rss_before_build = rss_bytes()
    try:
        model = build_model(settings, variant, device, dtype)
    except Exception as exc:  # bitsandbytes without kernels for this device, a model too big, and the like
        skipped = _skip_reason(exc, variant, device, "building")
    else:
        skipped = None
    if skipped:
        free(device)  # outside the except block: its traceback holds the tensors
        return VariantResult(variant, skipped=skipped)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(settings.seed + 1)
    batch = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=generator).to(device)
    result = VariantResult(variant, weights_bytes=weights_bytes(model))
    step = STEPS[variant]
    autocast = ((lambda: torch.autocast("cuda", dtype=dtype)) if cuda and dtype in (torch.bfloat16, torch.float16)
                else nullcontext)
    free(device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.memory_measure = "cuda max_memory_allocated (weights included)"
        result.raw["allocated_before_steps"] = torch.cuda.memory_allocated(device)
    elif reset_peak_rss():
        result.memory_measure = "peak RSS during the steps minus RSS before building (weights included)"
    else:
        result.memory_measure = "process peak RSS (ru_maxrss, includes building) minus RSS before building"
    rss_after_build = rss_bytes()
    skipped = None
    try:
        for i in range(settings.warmup + settings.repeats):
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            result.loss = step(model, batch, autocast)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= settings.warmup:
                result.step_times.append(time.perf_counter() - started)
    except Exception as exc:
        skipped = _skip_reason(exc, variant, device, "stepping")
    if skipped:
        del model, batch
        free(device)
        return VariantResult(variant, skipped=skipped)
    result.step_seconds = statistics.median(result.step_times)
    if cuda:
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
        result.peak_memory_bytes = peak - rss_before_build
        result.raw.update(peak_rss=peak, rss_before_build=rss_before_build, rss_after_build=rss_after_build)
    del model, batch
    free(device)
    return result


def _skip_reason(exc: Exception, variant: str, device: torch.device, when: str) -> str:
    """Why a variant is reported as skipped; re-raises what is neither out-of-memory nor an int8 failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory while {when}: {_reason(exc)}"
    if variant == "lora-guided-8bit" and not isinstance(exc, UserError):
        return f"int8 base failed on {device.type} while {when}: {_reason(exc)}"
    raise exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _run_isolated(settings: BenchSettings, variant: str) -> VariantResult:
    """Run one variant in a fresh Python process, so its peak memory is its own."""
    payload = {"settings": asdict(settings) | {"variants": list(settings.variants)}, "variant": variant}
    return VariantResult(**run_isolated("prunetune.bench.criterion", payload, f"the '{variant}' variant"))


def bench_criterion(settings: BenchSettings, *, isolate: bool | None = None,
                    log: Callable[[str], None] = lambda msg: None) -> BenchResult:
    """Run the variants one after another. `isolate` (default: on the CPU) runs each in its own process."""
    from ..models import check_architecture, load_config, pick_device, pick_dtype, resolve_model_spec

    settings.check()
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    if settings.model is not None:  # fail on a bad spec before any process starts
        config = load_config(resolve_model_spec(settings.model))
        check_architecture(config)
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        if limit and settings.seq_len > limit:
            raise SettingError("BenchSettings.seq_len", f"BenchSettings.seq_len {settings.seq_len} is beyond the "
                               f"model's {limit} positions; use BenchSettings.seq_len {limit} or less")
    else:
        config = shape_config(settings.shape, settings.seq_len)
    if isolate is None:
        isolate = device.type == "cpu"
    results = []
    for variant in settings.variants:
        log(f"{variant}: building the model and running {settings.warmup} + {settings.repeats} steps")
        result = _run_isolated(settings, variant) if isolate else run_variant(settings, variant)
        if result.skipped:
            log(f"{variant}: skipped ({result.skipped})")
        else:
            log(f"{variant}: {result.step_seconds:.3f}s a step, peak {result.peak_memory_bytes / GIB:.2f} GiB")
        results.append(result)
    measures = {r.memory_measure for r in results if r.memory_measure}
    measure = " / ".join(sorted(measures))
    if isolate and device.type == "cpu":
        measure += "; " + isolation_note("variant")
    return BenchResult(settings, str(device), device_name(device), str(dtype).removeprefix("torch."), measure,
                       results, config=_config_summary(config))


def _config_summary(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    return {k: getattr(config, k, None) for k in keys}


# ---------------------------------------------------------------------------------------------
# Presentation


def result_table(result: BenchResult):
    """A rich table of the variants, with ratios against taylor."""
    from rich.table import Table

    s = result.settings
    table = Table(title=f"criterion step: {s.label}, {result.dtype}, batch {s.batch_size} x {s.seq_len} tokens"
                        + (", gradient checkpointing" if s.gradient_checkpointing else ""))
    table.add_column("variant", no_wrap=True)
    for column in ("step time (s)", "speed-up vs taylor", "peak memory (GiB)", "memory vs taylor", "weights (GiB)"):
        table.add_column(column, justify="right")
    for v in result.variants:
        if v.skipped:
            table.add_row(v.variant, "skipped", "", "", "", "")
            continue
        r = result.ratios(v.variant)
        table.add_row(
            v.variant, f"{v.step_seconds:.3f}",
            "" if v.variant == "taylor" or r["speedup"] is None else f"{r['speedup']:.2f}x",
            f"{v.peak_memory_bytes / GIB:.2f}",
            "" if v.variant == "taylor" or r["memory_ratio"] is None else f"{r['memory_ratio']:.0%}",
            f"{v.weights_bytes / GIB:.2f}",
        )
    return table


def result_notes(result: BenchResult) -> list[str]:
    s = result.settings
    lines = [f"device: {result.device_name} ({result.device}); dtype {result.dtype}; "
             f"{s.warmup} warm-up + {s.repeats} timed steps, median step time",
             f"peak memory: {result.memory_measure}"]
    lines += [f"{v.variant} skipped: {v.skipped}" for v in result.variants if v.skipped]
    return lines


# ---------------------------------------------------------------------------------------------
# Worker process: `python -m prunetune.bench.criterion --payload JSON --result FILE`


def _work(payload: dict) -> dict:
    raw = payload["settings"]
    settings = BenchSettings(**raw | {"variants": tuple(raw["variants"])})
    return asdict(run_variant(settings, payload["variant"]))


if __name__ == "__main__":
    sys.exit(worker_main(_work, description="One criterion-benchmark variant (for `prunetune bench-criterion`)."))
