"""The speed benchmark's table and notes (`prunetune bench`)."""

from __future__ import annotations

from ..measure import GIB, MIB
from .speed import SpeedResult


def _count(n: int | None) -> str:
    if n is None:
        return ""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _with_ratio(text: str, ratio: float | None) -> str:
    """A measurement and, dimmed after it, its ratio to the first row: '646.6 ×0.80'."""
    return text if not text or ratio is None else f"{text} [dim]×{ratio:.2f}[/dim]"


def _bytes_formatter(values: list[int | None]):
    unit, name = (GIB, "GiB") if max((v or 0 for v in values), default=0) >= GIB else (MIB, "MiB")
    return name, (lambda v: "" if v is None else f"{v / unit:.2f}" if unit == GIB else f"{v / unit:.3g}")


def result_table(result: SpeedResult):
    """One row per model: parameters, prefill latency and FLOPs, decode speed, memory, each with its
    ratio to the first row (compact, so it reads in an 80-column terminal or a CI log)."""
    from rich.table import Table

    s = result.settings
    memory_unit, memory = _bytes_formatter([r.peak_memory_bytes for r in result.rows] +
                                           [r.weights_bytes for r in result.rows])
    table = Table(title=f"inference: batch {s.batch_size} x {s.prompt_len}-token prompt, then {s.decode_tokens} "
                        f"decode tokens; {result.dtype}, {result.device_name}",
                  caption=f"×: this row / the first ({result.rows[0].label}); for tok/s above 1 is faster. "
                          f"prefill: ms and FLOPs of the forward pass over the prompt; tok/s: decode; "
                          f"peak memory in {memory_unit} (weights included)")
    table.add_column("model", overflow="fold", min_width=min(16, max(len(r.label) for r in result.rows)))
    for column in ("params", "prefill ms", "FLOPs", "tok/s", f"peak {memory_unit}"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        r = result.ratios(row)
        flops = _with_ratio(_count(row.prefill_flops), r["flops_ratio"])
        if row.skipped:
            table.add_row(row.label, _count(row.parameters), "skipped", flops, "", "")
            continue
        decode = "" if row.decode_tokens_per_second is None else f"{row.decode_tokens_per_second:.1f}"
        table.add_row(row.label, _count(row.parameters),
                      _with_ratio(f"{row.prefill_seconds * 1e3:.1f}", r["prefill_ratio"]), flops,
                      _with_ratio(decode, r["decode_ratio"]),
                      _with_ratio(memory(row.peak_memory_bytes), r["memory_ratio"]))
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
