"""The speed benchmark's table and notes (`prunetune bench`)."""

from __future__ import annotations

from .measure import GIB, MIB
from .speed import SpeedResult


def _count(n: int | None) -> str:
    if n is None:
        return ""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _bytes_formatter(values: list[int | None]):
    unit, name = (GIB, "GiB") if max((v or 0 for v in values), default=0) >= GIB else (MIB, "MiB")
    return name, (lambda v: "" if v is None else f"{v / unit:.2f}" if unit == GIB else f"{v / unit:.3g}")


def result_table(result: SpeedResult):
    """One row per model: parameters, prefill latency and FLOPs, decode speed, memory; ratios to the first row."""
    from rich.table import Table

    s = result.settings
    memory_unit, memory = _bytes_formatter([r.peak_memory_bytes for r in result.rows] +
                                           [r.weights_bytes for r in result.rows])
    table = Table(title=f"inference: batch {s.batch_size} x {s.prompt_len}-token prompt, then {s.decode_tokens} "
                        f"decode tokens; {result.dtype}, {result.device_name}",
                  caption=f"ratio: this row / the first ({result.rows[0].label}); for tok/s above 1 is faster. "
                          f"prefill: ms and FLOPs of the forward pass over the prompt; tok/s: decode; "
                          f"peak memory and weights in {memory_unit}")
    table.add_column("model", no_wrap=True)
    for column in ("params", "prefill ms", "ratio", "FLOPs", "ratio", "tok/s", "ratio", "peak", "ratio", "weights"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        r = result.ratios(row)
        if row.skipped:
            table.add_row(row.label, _count(row.parameters), "skipped", "", _count(row.prefill_flops),
                          _ratio(r["flops_ratio"]), "", "", "", "", memory(row.weights_bytes))
            continue
        decode = "" if row.decode_tokens_per_second is None else f"{row.decode_tokens_per_second:.1f}"
        table.add_row(row.label, _count(row.parameters), f"{row.prefill_seconds * 1e3:.1f}", _ratio(r["prefill_ratio"]),
                      _count(row.prefill_flops), _ratio(r["flops_ratio"]), decode, _ratio(r["decode_ratio"]),
                      memory(row.peak_memory_bytes), _ratio(r["memory_ratio"]), memory(row.weights_bytes))
    return table


def result_notes(result: SpeedResult) -> list[str]:
    s = result.settings
    lines = [
        f"device: {result.device_name} ({result.device}); dtype {result.dtype}; {s.warmup} warm-up + {s.repeats} "
        "timed runs, medians",
        "prefill: one forward pass over the random prompt with use_cache=True, logits for the last position only; "
        f"decode: {s.decode_tokens} greedy one-token steps over the KV cache, prefill excluded",
        f"peak memory: {result.memory_measure}",
        "prefill FLOPs: 2 x multiply-adds of q,k,v,o,gate,up,down (and unmerged LoRA) for every prompt token at each "
        "layer's own shape, attention scores and values over the causal token pairs, lm_head for the last position",
    ]
    if s.lora:
        adapted = next((r for r in result.rows if r.lora_parameters), None)
        size = f" ({_count(adapted.lora_parameters)} parameters)" if adapted else ""
        lines.append(f"LoRA: {s.lora}{size}, loaded with PeftModel.from_pretrained (PEFT's default adapter dtype); "
                     "merged with merge_and_unload")
        lines += [f"LoRA not measured on {misfit}" for misfit in result.lora_misfits]
    lines += [f"{row.label} skipped: {row.skipped}" for row in result.rows if row.skipped]
    return lines
