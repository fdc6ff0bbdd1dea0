"""Inference speed and memory of models side by side (`prunetune bench`): prefill latency, decode
tokens per second and peak memory, with ratios against the first model, and the prefill's FLOPs so
a latency ratio can be read against the FLOPs ratio.

A model is anything `load_model` accepts (pruned directories with per-layer shapes included) or
`shape:NAME`, a random model of a named shape (shapes.py). With an adapter (`lora`), every model
it fits is also measured with the PEFT adapter unmerged and with it merged (merge_and_unload).

  prefill  one forward pass over a random prompt of `prompt_len` tokens (`batch_size` sequences),
           use_cache=True, logits for the last position only (logits_to_keep=1, as `generate`
           asks for), timed between device synchronisations.
  decode   `decode_tokens` greedy steps after the prompt, each a forward pass of one token over the
           KV cache (transformers' default DynamicCache); the steps are timed together, prefill
           excluded. The loop is written here rather than timing `generate` and subtracting a
           prefill: the timer then holds the decode steps and nothing else, not the difference of
           two noisy measurements plus `generate`'s own per-step bookkeeping.
  memory   GPU: torch.cuda.max_memory_allocated over the runs, the peak reset after loading; the
           weights are resident, so they are included. CPU: each model runs in its own process
           (measure.run_isolated); its peak resident set during the runs minus its resident set
           before loading: weights, KV cache and activations, not the Python/torch runtime.

`warmup` untimed runs come first, then `repeats` timed ones; medians are reported.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import SettingError, UserError
from .flops import prefill_flops
from ..measure import (
    device_name,
    free,
    isolation_note,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    synchronize,
    versions,
    weights_bytes,
    worker_main,
)
from .shapes import random_model, shape_config

SHAPE_PREFIX = "shape:"
VARIANTS = ("model", "lora-unmerged", "lora-merged")


@dataclass
class SpeedSettings:
    models: tuple[str, ...] = ()
    prompt_len: int = 2048
    decode_tokens: int = 128
    batch_size: int = 1
    warmup: int = 2
    repeats: int = 5
    lora: str | None = None  # a PEFT adapter directory
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    device: str = "auto"
    seed: int = 0

    def check(self) -> None:
        from ..models import pick_device, pick_dtype

        if not self.models:
            raise UserError("name at least one model to measure")
        for name, least in (("prompt_len", 1), ("decode_tokens", 0), ("batch_size", 1), ("warmup", 0),
                            ("repeats", 1)):
            if getattr(self, name) < least:
                raise SettingError(f"SpeedSettings.{name}",
                                   f"SpeedSettings.{name} must be at least {least}, got {getattr(self, name)}")
        pick_dtype(self.dtype, pick_device(self.device))


@dataclass(frozen=True)
class Job:
    """One row of the table: a model, or a model with the adapter unmerged or merged."""

    model: str
    variant: str = "model"

    @property
    def label(self) -> str:
        return {"model": self.model, "lora-unmerged": f"{self.model} + LoRA (unmerged)",
                "lora-merged": f"{self.model} + LoRA (merged)"}[self.variant]


@dataclass
class Row:
    model: str
    variant: str = "model"
    parameters: int = 0  # the model's own (count_parameters), adapter excluded
    lora_parameters: int = 0
    weights_bytes: int = 0  # parameters and buffers, adapter included
    prefill_flops: int = 0
    prefill_seconds: float | None = None  # medians of the timed runs
    decode_tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    prefill_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)
    memory_measure: str = ""
    raw: dict = field(default_factory=dict)  # measure-specific extras (CPU RSS values)
    skipped: str | None = None  # why the row was not measured (out of memory)

    @property
    def label(self) -> str:
        return Job(self.model, self.variant).label


@dataclass
class SpeedResult:
    settings: SpeedSettings
    device: str
    device_name: str
    dtype: str
    memory_measure: str
    rows: list[Row]
    lora_misfits: list[str] = field(default_factory=list)  # models the adapter does not fit, and why

    def ratios(self, row: Row) -> dict:
        """This row against the first: time, FLOPs, memory and parameters as this / first;
        decode as tokens per second this / first (above 1: faster)."""
        ref = self.rows[0]

        def div(a, b):
            return a / b if a is not None and b else None
        return {"prefill_ratio": div(row.prefill_seconds, ref.prefill_seconds),
                "flops_ratio": div(row.prefill_flops, ref.prefill_flops),
                "decode_ratio": div(row.decode_tokens_per_second, ref.decode_tokens_per_second),
                "memory_ratio": div(row.peak_memory_bytes, ref.peak_memory_bytes),
                "parameters_ratio": div(row.parameters, ref.parameters)}

    def to_dict(self) -> dict:
        return {
            "benchmark": "speed",
            "settings": asdict(self.settings) | {"models": list(self.settings.models)},
            "device": self.device,
            "device_name": self.device_name,
            "dtype": self.dtype,
            "memory_measure": self.memory_measure,
            "reference": self.rows[0].label,
            "rows": [asdict(r) | {"label": r.label} | self.ratios(r) for r in self.rows],
            "lora_misfits": self.lora_misfits,
            "versions": versions(),
        }


# ---------------------------------------------------------------------------------------------
# Checking everything before any model is loaded


def model_config(spec: str, positions: int = 0):
    """The config of a model spec (`shape:NAME` included), without loading weights."""
    from ..models import check_architecture, load_config, resolve_model_spec

    if spec.startswith(SHAPE_PREFIX):
        return shape_config(spec[len(SHAPE_PREFIX):], positions)
    config = load_config(resolve_model_spec(spec))
    check_architecture(config)
    return config


def plan(settings: SpeedSettings) -> tuple[list[Job], list[str]]:
    """The rows to measure, in order, and why the adapter does not fit the models it skips.

    Every user mistake is raised here, before anything heavy."""
    from ..evaluate.adapter import adapter_modules, adapter_mismatch

    settings.check()
    needed = settings.prompt_len + settings.decode_tokens
    modules = adapter_modules(settings.lora) if settings.lora else None
    jobs, misfits = [], []
    for spec in settings.models:
        config = model_config(spec, needed)
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        if limit and needed > limit:
            room = limit - settings.decode_tokens
            advice = (f"use SpeedSettings.prompt_len {room} or less" if room >= 1 else
                      f"keep SpeedSettings.prompt_len + SpeedSettings.decode_tokens at {limit} or less")
            raise SettingError("SpeedSettings.prompt_len", f"'{spec}' has {limit} positions, fewer than "
                               f"SpeedSettings.prompt_len {settings.prompt_len} + SpeedSettings.decode_tokens "
                               f"{settings.decode_tokens}; {advice}")
        jobs.append(Job(spec))
        if modules is not None:
            why = adapter_mismatch(modules, config)
            if why is None:
                jobs += [Job(spec, "lora-unmerged"), Job(spec, "lora-merged")]
            else:
                misfits.append(f"{spec}: {why}")
    if modules is not None and len(jobs) == len(settings.models):
        raise UserError(f"the adapter '{settings.lora}' fits none of the models ({'; '.join(misfits)}); "
                        "pass the model it was trained on")
    return jobs, misfits


# ---------------------------------------------------------------------------------------------
# Measuring one row (in this process, or in a worker process on the CPU)


def load(settings: SpeedSettings, job: Job, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from ..models import load_model

    if job.model.startswith(SHAPE_PREFIX):
        config = model_config(job.model, settings.prompt_len + settings.decode_tokens)
        model = random_model(config, device, dtype, settings.seed)
    else:
        model, tokenizer = load_model(job.model, dtype=str(dtype).removeprefix("torch."), device=str(device))
        del tokenizer
    if job.variant != "model":
        from ..families.adapters import load_peft

        model = load_peft(model, settings.lora)
        if job.variant == "lora-merged":
            model = model.merge_and_unload()
    return model.eval()


def timed_generation(model: nn.Module, prompt: torch.Tensor, steps: int,
                     device: torch.device) -> tuple[float, float, torch.Tensor]:
    """Prefill, then `steps` greedy decode steps over the KV cache.

    Returns (prefill seconds, decode seconds, the steps + 1 greedy tokens: the prefill's, then one a step).
    """
    synchronize(device)
    started = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefilled = time.perf_counter()
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens = [token]
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    synchronize(device)
    return prefilled - started, time.perf_counter() - prefilled, torch.cat(tokens, dim=1)


def _preload(settings: SpeedSettings, job: Job) -> None:
    """Import what loading will import, so its memory is not counted as the model's."""
    import safetensors.torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    model_type = model_config(job.model).model_type
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    importlib.import_module("transformers.models.mistral.modeling_mistral")  # head-pruned Llamas are saved as Mistral
    if job.variant != "model":
        import peft  # noqa: F401
    # Start the runtime's lazily created pieces (thread pools, kernel caches) outside the measure.
    with torch.inference_mode():
        x = torch.ones(1, 2, 64, 64)
        torch.nn.functional.scaled_dot_product_attention(x @ x, x, x, is_causal=True).argmax(-1)


def measure(settings: SpeedSettings, job: Job) -> Row:
    """Load one row's model, run warm-up and timed generations, measure, free it."""
    from ..training.lora import lora_matrices
    from ..models import pick_device, pick_dtype
    from ..structure.units import Structure, count_parameters, decoder_layers

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    _preload(settings, job)
    free(device)
    rss_before = rss_bytes()
    model = load(settings, job, device, dtype)
    structure = Structure.of(model)
    lora = [(m.A.shape[0], m.A.shape[1], m.B.shape[0]) for layer in decoder_layers(model) for m in lora_matrices(layer)]
    row = Row(job.model, job.variant, parameters=count_parameters(model)["total"],
              lora_parameters=sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
              weights_bytes=weights_bytes(model),
              prefill_flops=prefill_flops(structure, settings.prompt_len, settings.batch_size, lora))
    generator = torch.Generator().manual_seed(settings.seed + 1)
    prompt = torch.randint(0, structure.vocab, (settings.batch_size, settings.prompt_len), generator=generator)
    prompt = prompt.to(device)
    free(device)
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        row.memory_measure = "cuda max_memory_allocated during the runs (weights included)"
    elif reset_peak_rss():
        row.memory_measure = "peak RSS during the runs minus RSS before loading (weights included)"
    else:
        row.memory_measure = "process peak RSS (ru_maxrss, loading included) minus RSS before loading"
    rss_loaded = rss_bytes()
    try:
        with torch.inference_mode():
            for i in range(settings.warmup + settings.repeats):
                prefill_s, decode_s, _ = timed_generation(model, prompt, settings.decode_tokens, device)
                if i >= settings.warmup:
                    row.prefill_times.append(prefill_s)
                    row.decode_times.append(decode_s)
    except torch.OutOfMemoryError as exc:
        row.skipped = f"out of memory: {str(exc).strip().splitlines()[0][:200]}"
    if row.skipped:  # outside the except block: its traceback holds the tensors
        del model, prompt
        free(device)
        return row
    row.prefill_seconds = statistics.median(row.prefill_times)
    if settings.decode_tokens:
        decode_seconds = statistics.median(row.decode_times)
        row.decode_tokens_per_second = settings.batch_size * settings.decode_tokens / decode_seconds
    if cuda:
        row.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
        row.peak_memory_bytes = peak - rss_before
        row.raw.update(peak_rss=peak, rss_before_loading=rss_before, rss_after_loading=rss_loaded)
    del model, prompt
    free(device)
    return row


# ---------------------------------------------------------------------------------------------
# Running the rows


def bench_speed(settings: SpeedSettings, *, isolate: bool | None = None,
                log: Callable[[str], None] = lambda msg: None) -> SpeedResult:
    """Measure every row. `isolate` (default: on the CPU) runs each in its own process."""
    from ..models import pick_device, pick_dtype

    jobs, misfits = plan(settings)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    if isolate is None:
        isolate = device.type == "cpu"
    rows = []
    for job in jobs:
        log(f"{job.label}: loading, then {settings.warmup} warm-up + {settings.repeats} timed runs")
        if isolate:
            payload = {"settings": asdict(settings), "job": asdict(job)}
            row = Row(**run_isolated("prunetune.bench.speed", payload, job.label))
        else:
            row = measure(settings, job)
        if row.skipped:
            log(f"{job.label}: skipped ({row.skipped})")
        else:
            decode = (f", decode {row.decode_tokens_per_second:.1f} tokens/s" if row.decode_tokens_per_second
                      else "")
            log(f"{job.label}: prefill {row.prefill_seconds * 1e3:.1f} ms{decode}")
        rows.append(row)
    measure_text = " / ".join(sorted({r.memory_measure for r in rows if r.memory_measure}))
    if isolate and device.type == "cpu":
        measure_text += "; " + isolation_note("model")
    return SpeedResult(settings, str(device), device_name(device), str(dtype).removeprefix("torch."),
                       measure_text, rows, misfits)


# ---------------------------------------------------------------------------------------------
# Worker process: `python -m prunetune.bench.speed --payload JSON --result FILE`


def _work(payload: dict) -> dict:
    raw = payload["settings"]
    settings = SpeedSettings(**raw | {"models": tuple(raw["models"])})
    return asdict(measure(settings, Job(**payload["job"])))


if __name__ == "__main__":
    sys.exit(worker_main(_work, description="Measure one model's inference speed (used by `prunetune bench`)."))
