"""Mask agreement: do the LoRA-guided criterion and vanilla Taylor keep the same units? (LoRAPrune, Fig. 4)

One pass over the calibration batches gives both criteria the same gradients: the LoRA matrices and
the seven projection weights all require grad (everything else is frozen), and each batch's mean
loss, divided by the number of batches, is back-propagated, so the gradients accumulate to the mean
over the batches.

  taylor       |W ⊙ ∂L/∂W| summed per unit (importance/taylor.py, LLM-Pruner), W the frozen base weight.
  lora-guided  `lora_guided_scores` once, from the accumulated LoRA gradients: what LoRAPrune scores
               for one optimizer step whose gradient accumulates over these batches as micro-batches.

For every ratio both score sets go through the same `select_masks` (uniform allocation, so every
layer keeps the same number of units under both criteria), and for each unit kind we report

  overlap of kept units    |kept_taylor ∩ kept_lora| / |kept_taylor|
  overlap of pruned units  the same over the pruned units (more telling at small ratios)
  random baseline          the expected overlap of two random choices with the same per-layer
                           counts: Σ k_i² / N_i / Σ k_i for kept counts k_i of N_i units (≈ the kept
                           fraction), and likewise for the pruned ones.

Heads are compared as query heads; with `kv-group` units each group counts its query heads, which
leaves the fractions unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...errors import SettingError
from ...importance.lora_guided import SCORE_KINDS, lora_guided_scores
from ...structure.scores import LayerScores
from ...importance.taylor import quantized_refusal, scores_from_weight_gradients, weight_gradients
from ...training.lora import LoraSettings, add_lora, lora_matrices
from ...structure.allocate import achieved_ratio, check_ratio, parse_layers, parse_round_to, parse_units, select_masks
from ...structure.masks import Masks
from ...structure.units import HEAD_UNITS, Structure, decoder_layers
from .pruner import check_normalize, resolve_normalize, scale_to_unit_total

# heads-first: per-module normalised LoRA-guided scores put heads and channels on no common scale,
# and the comparison is of the criteria, not of a split rule
COMPARED_SPLIT = "heads-first"


@dataclass
class AgreeSettings:
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    batches: int = 8  # calibration batches
    batch_size: int = 1
    seq_len: int = 128
    data: str = "builtin:pydoc"  # its train split
    layers: str | None = "all"
    units: str = "heads,channels"
    head_unit: str = "kv-group"
    round_to: int | str = 1  # 1: counts are not rounded, so rounding does not decide the agreement
    steps: int = 0  # LoRA training steps before scoring (0: a random B instead, see `randomize_lora_b`)
    lr: float = 5e-4  # as every LoRA training's default (README's measurements)
    lora_r: int = 8
    lora_alpha: int = 16
    score: str = "abs"  # lora-guided: abs (official code) or square (paper)
    # lora-guided: LoRAPrune's words (module, model, none); auto is module here, as in LoRAPrune under
    # the heads-first split every comparison uses (the official code's per-module L2 normalisation)
    normalize: str = "auto"
    seed: int = 0

    def check(self) -> None:
        if not self.ratios:
            raise SettingError("AgreeSettings.ratios", "AgreeSettings.ratios needs at least one ratio, e.g. "
                               "0.1,0.2,0.3,0.5")
        for ratio in self.ratios:
            check_ratio(ratio, "AgreeSettings.ratios")
        parse_units(self.units, "AgreeSettings.units")
        parse_round_to(self.round_to, "AgreeSettings.round_to")
        for name, least in (("batches", 1), ("batch_size", 1), ("lora_r", 1), ("lora_alpha", 1), ("seq_len", 2),
                            ("steps", 0)):
            if getattr(self, name) < least:
                raise SettingError(f"AgreeSettings.{name}",
                                   f"AgreeSettings.{name} must be at least {least}, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SettingError("AgreeSettings.lr", f"AgreeSettings.lr must be positive, got {self.lr}")
        for name, choices in (("head_unit", HEAD_UNITS), ("score", SCORE_KINDS)):
            if getattr(self, name) not in choices:
                raise SettingError(f"AgreeSettings.{name}", f"unknown AgreeSettings.{name} '{getattr(self, name)}'; "
                                   f"use {' or '.join(choices)}")
        check_normalize(self.normalize, "AgreeSettings.normalize")

    @property
    def normalization(self) -> str:
        """module, model or none, as LoRAPrune resolves the word under the heads-first split."""
        return resolve_normalize(self.normalize, COMPARED_SPLIT)


def parse_ratios(spec: str) -> tuple[float, ...]:
    """'0.1,0.2,0.3' -> (0.1, 0.2, 0.3), the text form of AgreeSettings.ratios; each strictly between 0 and 1."""
    name = "AgreeSettings.ratios"
    ratios = []
    for part in spec.split(","):
        if not part.strip():
            continue
        try:
            ratio = float(part)
        except ValueError:
            raise SettingError(name, f"cannot read {name} '{spec}'; use comma-separated fractions like "
                               "0.1,0.2,0.3,0.5") from None
        if not 0.0 < ratio < 1.0:
            raise SettingError(name, f"{name}: every ratio must be between 0 and 1 (exclusive), got {part.strip()}")
        ratios.append(ratio)
    if not ratios:
        raise SettingError(name, f"{name} needs at least one ratio, e.g. 0.1,0.2,0.3,0.5")
    return tuple(ratios)


# ---------------------------------------------------------------------------------------------
# Scores from one pass


@torch.no_grad()
def randomize_lora_b(model: nn.Module, seed: int = 0) -> None:
    """Give every LoRA B a random init instead of PEFT's zeros.

    With B = 0 the gradient of A is zero (∂L/∂A = s·Bᵀ·…), so the LoRA-guided estimate of ∂L/∂W
    collapses to s·(∂L/∂W)·AᵀA: the true gradient seen through the rank-r row space of the random
    A, which keeps which output rows matter but mixes the input columns (the units of o_proj and
    down_proj); and W + s·B·A is just W. A random B adds the term s·B·Bᵀ·(∂L/∂W), which keeps
    the columns. B is drawn the way PEFT draws A, over the other dimension (uniform in ±1/√out),
    so both terms weigh alike; s·B·A is then small beside W.
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in decoder_layers(model):
        for lora in lora_matrices(layer):
            bound = 1.0 / math.sqrt(lora.B.shape[0])
            values = torch.rand(lora.B.shape, generator=generator) * (2 * bound) - bound
            lora.B.copy_(values.to(lora.B.dtype))


def accumulate_scores(model: nn.Module, batches: list[torch.Tensor], *, score: str = "abs",
                      normalize: bool = True) -> tuple[list[LayerScores], list[LayerScores]]:
    """(taylor, lora-guided) scores from one forward and backward pass per batch; `model` has LoRA."""
    if not batches:
        raise SettingError("AgreeSettings.batches", "masks-agree needs calibration batches: AgreeSettings.data "
                           "and AgreeSettings.batches")
    quantized_refusal(model, "masks-agree (it compares against taylor)")
    loras = [lora for layer in decoder_layers(model) for lora in lora_matrices(layer)]
    if not loras:
        raise ValueError("the model has no LoRA; wrap it with add_lora first")
    with weight_gradients(model, batches, also=[p for lora in loras for p in (lora.A, lora.B)], mean=True):
        return scores_from_weight_gradients(model), lora_guided_scores(model, score=score, normalize=normalize)


# ---------------------------------------------------------------------------------------------
# Comparing masks


def overlap(kept_a: torch.Tensor, kept_b: torch.Tensor) -> float | None:
    """|A ∩ B| / |A| for boolean membership tensors of the same units; None when A is empty."""
    kept_a, kept_b = kept_a.bool().flatten(), kept_b.bool().flatten()
    if kept_a.shape != kept_b.shape:
        raise ValueError(f"masks over different units: {tuple(kept_a.shape)} and {tuple(kept_b.shape)}")
    size = int(kept_a.sum())
    return None if size == 0 else int((kept_a & kept_b).sum()) / size


def random_overlap(chosen: list[int], totals: list[int]) -> float | None:
    """Expected |A ∩ B| / |A| when every layer i picks chosen[i] of totals[i] units at random, twice."""
    size = sum(chosen)
    return None if size == 0 else sum(c * c / n for c, n in zip(chosen, totals)) / size


def kept_units(structure: Structure, masks: Masks, layers: list[int], kind: str) -> list[torch.Tensor]:
    """Per layer, which query heads (kind 'heads') or MLP channels ('channels') the masks keep."""
    result = []
    for i in layers:
        shape = structure.layers[i]
        if kind == "heads":
            result.append(masks.heads.get(i, torch.ones(shape.num_heads, dtype=torch.bool)).bool())
        else:
            result.append(masks.channels.get(i, torch.ones(shape.intermediate, dtype=torch.bool)).bool())
    return result


def compare_masks(structure: Structure, masks_a: Masks, masks_b: Masks, layers: list[int], kind: str) -> dict:
    """Overlap of kept and of pruned units of one kind, with the random baseline."""
    a, b = kept_units(structure, masks_a, layers, kind), kept_units(structure, masks_b, layers, kind)
    if [int(x.sum()) for x in a] != [int(x.sum()) for x in b]:
        raise ValueError("the two masks keep different numbers of units in some layer")
    kept_a, kept_b = torch.cat(a), torch.cat(b)
    kept = [int(x.sum()) for x in a]
    totals = [len(x) for x in a]
    return {
        "units": len(kept_a),
        "kept": int(kept_a.sum()),
        "overlap_kept": overlap(kept_a, kept_b),
        "overlap_pruned": overlap(~kept_a, ~kept_b),
        "random_kept": random_overlap(kept, totals),
        "random_pruned": random_overlap([n - k for n, k in zip(totals, kept)], totals),
    }


def compare_scores(structure: Structure, scores_a: list[LayerScores], scores_b: list[LayerScores],
                   ratios, layers: list[int], units: tuple[str, ...] = ("heads", "channels"),
                   head_unit: str = "kv-group", round_to: int | str = 1) -> list[dict]:
    """For each ratio: masks from both score sets, and their agreement per unit kind."""
    results = []
    for ratio in ratios:
        a = select_masks(structure, scores_a, ratio, layers, units, head_unit, round_to, split=COMPARED_SPLIT)
        b = select_masks(structure, scores_b, ratio, layers, units, head_unit, round_to, split=COMPARED_SPLIT)
        entry = {"ratio": ratio, "ratio_achieved": achieved_ratio(structure, a, layers, units)}
        for kind in units:
            entry[kind] = compare_masks(structure, a, b, layers, kind)
        results.append(entry)
    return results


# ---------------------------------------------------------------------------------------------
# The whole measurement


def masks_agree(model_spec: str, settings: AgreeSettings, *, dtype: str = "auto", device: str = "auto",
                progress: bool = True, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Load a model, score it with both criteria on the same batches, and compare their masks."""
    from ...data import load_blocks, load_examples
    from ...evaluate.perplexity import check_seq_len
    from ...models import check_load_options, check_model, load_model
    from ...report import provenance
    from ...training.loop import TrainSettings, train

    started = time.perf_counter()
    settings.check()
    load_examples(settings.data)  # a bad data spec fails before the model loads
    check_load_options(dtype, device)
    config = check_model(model_spec, {"AgreeSettings.seq_len": settings.seq_len})  # ... its layers and length
    parse_layers(settings.layers, config.num_hidden_layers, "AgreeSettings.layers")
    model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
    structure = Structure.of(model)
    layers = parse_layers(settings.layers, structure.num_layers)
    units = parse_units(settings.units)
    check_seq_len(model, settings.seq_len)
    blocks, loss_mask = load_blocks(settings.data, tokenizer, settings.seq_len, default_split="train")
    needed = settings.batches * settings.batch_size
    if len(blocks) < needed:
        raise SettingError("AgreeSettings.batches", f"the data has {len(blocks)} blocks of {settings.seq_len} tokens, "
                           f"fewer than AgreeSettings.batches {settings.batches} x AgreeSettings.batch_size "
                           f"{settings.batch_size}; use fewer or shorter batches")
    torch.manual_seed(settings.seed)  # PEFT's init of A
    model = add_lora(model, LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha))
    if settings.steps:
        log(f"training the LoRA for {settings.steps} steps")
        run = train(model, blocks, loss_mask, TrainSettings(steps=settings.steps, batch_size=settings.batch_size,
                                                            seq_len=settings.seq_len, lr=settings.lr,
                                                            seed=settings.seed), progress=progress, log=log)
        lora_state = f"trained {settings.steps} steps from PEFT's init (final loss {run.history[-1]['loss']:.3f})"
    else:
        randomize_lora_b(model, settings.seed)
        lora_state = f"untrained; B drawn at random (seed {settings.seed}) instead of PEFT's zeros"
    batches = list(blocks[:needed].split(settings.batch_size))
    log(f"scoring with both criteria on {len(batches)} batches of {settings.batch_size} x {settings.seq_len} tokens")
    taylor, lora = accumulate_scores(model, batches, score=settings.score,
                                     normalize=settings.normalization == "module")
    if settings.normalization == "model":
        lora = scale_to_unit_total(lora)
    results = compare_scores(structure, taylor, lora, settings.ratios, layers, units, settings.head_unit,
                             settings.round_to)
    return provenance(
        "masks-agree",
        model=model_spec,
        settings=asdict(settings) | {"ratios": list(settings.ratios), "dtype": dtype},
        layers=layers,
        lora=lora_state,
        criteria={
            "taylor": "|W * dL/dW| summed per unit, W the frozen base weight (LLM-Pruner)",
            "lora-guided": f"LoRAPrune's estimate from the accumulated LoRA gradients, score {settings.score}, "
                           f"normalisation {settings.normalization}"
                           + (" (per-module L2, the official code)" if settings.normalization == "module" else ""),
            "gradients": f"mean over {len(batches)} batches, one backward pass each, shared by both",
        },
        results=results,
        elapsed_seconds=time.perf_counter() - started,
    )


def agreement_table(record: dict):
    """A rich table: per ratio and unit kind, overlaps of kept and pruned units against random."""
    from rich.table import Table

    table = Table(title=f"taylor vs lora-guided masks: {record['model']}")
    table.add_column("ratio", justify="right")
    table.add_column("units", no_wrap=True)
    for column in ("kept", "overlap kept", "random", "overlap pruned", "random"):
        table.add_column(column, justify="right")

    def percent(value):
        return "-" if value is None else f"{value:.1%}"

    for entry in record["results"]:
        for kind in ("heads", "channels"):
            if kind not in entry:
                continue
            c = entry[kind]
            table.add_row(f"{entry['ratio']:g}", "query heads" if kind == "heads" else "MLP channels",
                          f"{c['kept']}/{c['units']}", percent(c["overlap_kept"]), percent(c["random_kept"]),
                          percent(c["overlap_pruned"]), percent(c["random_pruned"]))
    return table
