"""One-shot structured pruning: score every unit once, keep the best within the budget, cut, save.

This is the whole pipeline on the shared core (load -> units -> scores -> masks -> surgery ->
checkpoint -> evaluation); iterative methods reuse every step but the scoring loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import save_model
from ..data import load_examples
from ..errors import UserError
from ..evaluate.perplexity import check_seq_len, perplexity
from ..importance import CRITERIA
from ..models import load_model
from ..report import check_output_dir, provenance, run_directory, write_json, write_prune_report
from ..structure.allocate import (
    achieved_ratio, check_ratio, describe_prunable, parse_layers, parse_units, select_masks,
)
from ..structure.surgery import cut
from ..structure.units import HEAD_UNITS, Structure, count_parameters


@dataclass
class PruneSettings:
    method: str = "magnitude"
    ratio: float = 0.2
    layers: str = "all"  # 'all', 'paper' (first 10% and the last layer kept), or '3-27,29'
    units: str = "heads,channels"
    head_unit: str = "kv-group"
    round_to: int = 64

    def check(self) -> None:
        if self.method not in CRITERIA:
            raise UserError(f"unknown method '{self.method}'; available: {', '.join(CRITERIA)}")
        check_ratio(self.ratio)
        parse_units(self.units)
        if self.head_unit not in HEAD_UNITS:
            raise UserError(f"unknown --head-unit '{self.head_unit}'; use {' or '.join(HEAD_UNITS)}")
        if self.round_to < 1:
            raise UserError(f"--round-to must be at least 1, got {self.round_to}")


@dataclass
class EvalSettings:
    data: str | None = "builtin:pydoc"
    seq_len: int = 256
    max_windows: int | None = None


def prune(model_spec: str, out: Path, settings: PruneSettings, evaluation: EvalSettings, *,
          dtype: str = "auto", device: str = "auto", quant: str | None = None, overwrite: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Prune `model_spec` one-shot and save the smaller model in `out`; returns prunetune.json's record."""
    started = time.perf_counter()
    settings.check()
    check_output_dir(Path(out), overwrite)
    if evaluation.max_windows is not None and evaluation.max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {evaluation.max_windows}")
    if evaluation.data:
        load_examples(evaluation.data, default_split="eval")  # a bad data spec fails before the model loads
    model, tokenizer = load_model(model_spec, dtype=dtype, device=device, quant=quant)
    before = Structure.of(model)
    layers = parse_layers(settings.layers, before.num_layers)
    units = parse_units(settings.units)
    if evaluation.data:
        check_seq_len(model, evaluation.seq_len)
    params_before = count_parameters(model) | {"prunable": before.prunable_params(layers, units)}

    def evaluate(when: str):
        result = perplexity(model, tokenizer, evaluation.data, evaluation.seq_len,
                            max_windows=evaluation.max_windows, progress=progress)
        log(f"perplexity {when}: {result.perplexity:.3f} ({result.seconds:.1f}s)")
        return result.to_dict()

    results = {}
    if evaluation.data:
        results["perplexity_before"] = evaluate("before")

    scores = CRITERIA[settings.method](model)
    masks = select_masks(before, scores, settings.ratio, layers, units, settings.head_unit, settings.round_to)
    kept = masks.kept_summary(before)
    ratio = achieved_ratio(before, masks, layers, units)
    cut(model, masks)
    after = Structure.of(model)
    params_after = count_parameters(model) | {"prunable": after.prunable_params(layers, units)}
    if evaluation.data:
        results["perplexity_after"] = evaluate("after")

    record = provenance(
        "prune",
        source_model=model_spec,
        method=settings.method,
        settings=asdict(settings) | {"layers": layers, "dtype": dtype, "quant": quant},
        prunable=describe_prunable(before, layers, units),
        parameters={"before": params_before, "after": params_after,
                    "ratio_target": settings.ratio, "ratio_achieved": ratio},
        kept=kept,
        results=results,
    )
    with run_directory(Path(out), overwrite) as tmp:
        model, saved_as = save_model(model, tokenizer, tmp)
        record["architecture"] = {"source": before.model_type, "saved_as": saved_as,
                                  "stock_loadable": after.uniform, "layer_shapes": [asdict(s) for s in after.layers]}
        record["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        write_json(tmp / "prunetune.json", record)
        write_prune_report(tmp / "report.md", record)
    return record
