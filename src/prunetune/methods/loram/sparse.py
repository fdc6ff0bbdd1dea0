"""LoRAM's non-structured pruning: unstructured (`unst`) and 2:4 (`semi`) sparsity in place.

The weights keep their shapes and pruned entries are zero (Wanda's |W|·||X|| by default, compared
within each output row; importance/wanda_unstructured.py). The result is an ordinary checkpoint of
the source's shapes; its reduction ratio counts the non-zero parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ...data import load_blocks, load_examples
from ...families import refuse_experts
from .wanda_unstructured import sparsify
from ...runs.lifecycle import Run
from ...runs.settings import RunOptions
from ...structure.allocate import parse_layers
from .sparsity import check_pattern, reduction_ratio, sparsity_summary
from ...structure.units import count_parameters


def prune_sparse(model_spec: str, out: Path, settings, options: RunOptions, log: Callable[[str], None] = print) -> dict:
    """`prunetune loram prune --method unst|semi`: `settings` is a LoramPruneSettings."""
    criterion = settings.criterion or "wanda"
    ratio = settings.ratio  # semi (2:4) must be 0.5: check_pattern says so otherwise

    def check() -> None:
        check_pattern(settings.method, ratio)
        if criterion == "wanda":
            load_examples(settings.data, default_split="train")

    run = Run("loram prune", out, options, log=log, checks=[check], model=model_spec, accelerate=False,
              config_checks=[lambda config: refuse_experts(config, "LoRAM"),
                             lambda config: parse_layers(settings.layers or "all", config.num_hidden_layers,
                                                            "LoramPruneSettings.layers")],
              seq_lens={"LoramPruneSettings.seq_len": settings.seq_len} if criterion == "wanda" else {})
    model, tokenizer = run.load(model_spec)
    layers = parse_layers(settings.layers or "all", len(model.model.layers))
    before = count_parameters(model)
    batches = None
    if criterion == "wanda":
        blocks, _ = load_blocks(settings.data, tokenizer, settings.seq_len, default_split="train",
                                max_blocks=settings.calib_samples)
        batches = list(blocks.to(next(model.parameters()).device).split(1))
    run.log(f"{settings.method} pruning ({criterion}) of layers {layers[0]}-{layers[-1]} at sparsity {ratio}")
    sparsify(model, settings.method, ratio, criterion=criterion, batches=batches, layers=layers)
    summary = sparsity_summary(model)
    nonzero = summary["parameters"]["nonzero"]
    return run.finish(
        model, tokenizer, source_model=model_spec, method=settings.method,
        settings=asdict(settings) | {"criterion": criterion, "ratio": ratio, "layers": layers},
        loram={"method": settings.method, "criterion": criterion, "structured": False,
               "original_parameters": before["total"], "reduction_ratio": reduction_ratio(before["total"], nonzero),
               "sparsity": summary["overall"]},
        parameters={"before": before, "after": {**count_parameters(model), "nonzero": nonzero}},
    )
