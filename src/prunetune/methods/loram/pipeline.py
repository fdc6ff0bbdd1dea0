"""LoRAM: train the LoRA on a pruned model, serve it on the full one (Zhang, Wang et al., ICLR 2025).

    prune    MODEL -> PRUNED       structured (stru: Taylor by default, rand: random units) through the
                                   shared pruning pipeline, or unstructured / 2:4 (unst, semi: weights keep
                                   their shapes, pruned entries zero)
    align    PRUNED -> ALIGNED     full-parameter training on a general corpus, once: by distillation
                                   from the full model (default) or next-token loss (the paper)
    train    PRUNED -> ADAPTER     LoRA on the (aligned) pruned model, optionally on an NF4 base (QLoRAM)
    recover  ADAPTER -> FULL       the adapter at the full model's shapes (structure/recover.py)

Every step writes a run directory (prunetune.json, report.md); a pruned or aligned directory carries
the kept units of its source, so `recover` can find them from either.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...data import load_blocks, load_examples
from ...errors import SettingError, UserError
from ...evaluate.perplexity import perplexity
from ...training.lora import LoraSettings, add_lora
from ...models import resolve_model_spec
from ...report import read_record
from .sparsity import reduction_ratio
from ...structure.units import count_parameters
from ...training.distill import DistillSettings, model_teacher
from ...training.loop import TrainSettings
from ...training.rates import ALIGN_LR, LORA_LR
from ...runs.lifecycle import Run
from ...runs.settings import EvalSettings, RunOptions
from ..prune import PruneSettings, prune
from ...importance import CRITERIA
from ...structure.allocate import check_ratio

PRUNE_METHODS = ("stru", "rand", "semi", "unst")
STRUCTURED = {"stru": "taylor", "rand": "random"}  # LoRAM method -> the shared criterion it uses
QUANT_BITS = {None: 16, "8bit": 8, "nf4": 4}


@dataclass
class LoramPruneSettings:
    method: str = "stru"
    ratio: float = 0.5
    criterion: str | None = None  # stru: taylor (the paper, via LLM-Pruner); semi/unst: wanda
    # None: 'paper' for stru/rand (first 10% and the last layer whole; LLM-Pruner also spares the
    # ends), 'all' for semi/unst (as Wanda and SparseGPT)
    layers: str | None = None
    data: str = "builtin:pydoc"  # calibration data
    calib_samples: int = 10
    seq_len: int = 128
    seed: int = 0

    def check(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise SettingError("LoramPruneSettings.method", f"unknown LoramPruneSettings.method '{self.method}'; use "
                               f"{', '.join(PRUNE_METHODS)}")
        if self.method == "rand" and self.criterion not in (None, "random"):
            raise SettingError("LoramPruneSettings.criterion", "LoramPruneSettings.method rand prunes random units; "
                               "LoramPruneSettings.criterion applies to stru")
        for name, least in (("calib_samples", 1), ("seq_len", 2)):
            if getattr(self, name) < least:
                raise SettingError(f"LoramPruneSettings.{name}",
                                   f"LoramPruneSettings.{name} must be at least {least}, got {getattr(self, name)}")
        if self.method in STRUCTURED:
            criterion = self.criterion or STRUCTURED[self.method]
            if criterion not in CRITERIA:
                raise SettingError("LoramPruneSettings.criterion", f"unknown LoramPruneSettings.criterion "
                                   f"'{criterion}' for {self.method}; use {', '.join(CRITERIA)}")
            check_ratio(self.ratio, "LoramPruneSettings.ratio")
        else:
            from .wanda_unstructured import SPARSE_CRITERIA
            from .sparsity import check_pattern

            check_pattern(self.method, self.ratio)
            if (self.criterion or "wanda") not in SPARSE_CRITERIA:
                raise SettingError("LoramPruneSettings.criterion", f"unknown LoramPruneSettings.criterion "
                                   f"'{self.criterion}' for {self.method}; use {' or '.join(SPARSE_CRITERIA)}")


def prune_for_loram(model_spec: str, out: Path, settings: LoramPruneSettings, options: RunOptions | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Step 1: the pruned model LoRAM trains on, with its parameter reduction ratio."""
    settings.check()
    options = options or RunOptions()
    if settings.method not in STRUCTURED:
        from .sparse import prune_sparse

        return prune_sparse(model_spec, Path(out), settings, options, log=log)
    criterion = settings.criterion or STRUCTURED[settings.method]
    options.training.seq_len = settings.seq_len

    def loram_fields(fields: dict) -> dict:
        params = fields["parameters"]
        return {"loram": {"method": settings.method, "criterion": criterion, "structured": True,
                          "original_parameters": params["before"]["total"],
                          "reduction_ratio": reduction_ratio(params["before"]["total"], params["after"]["total"])}}

    return prune(model_spec, out, PruneSettings(method=criterion, ratio=settings.ratio,
                                                layers=settings.layers or _default_layers(model_spec),
                                                data=settings.data, calib_samples=settings.calib_samples,
                                                seed=settings.seed),
                 EvalSettings(data=None), options, log=log, command="loram prune", annotate=loram_fields)


def _default_layers(model_spec: str) -> str:
    """LoRAM's structured default is the paper's layers; a family whose layers must keep one shape (Phi-3)
    prunes them all."""
    from ...families import family_of
    from ...models import load_config

    config = load_config(resolve_model_spec(model_spec))
    return "all" if family_of(config).uniform_only else "paper"


def _source_fields(pruned: Path) -> dict:
    """What a LoRAM step carries forward from the pruned directory it started from."""
    record = read_record(pruned)
    if "loram" not in record and "kept" not in record:
        raise UserError(f"'{pruned}' is not a pruned model from `prunetune loram prune` or `prunetune prune`")
    carried = {key: record[key] for key in ("kept", "architecture", "loram", "source_model", "prunable")
               if key in record}
    carried.setdefault("loram", {"method": "stru", "structured": True})
    carried["pruned_from"] = record.get("pruned_from", str(pruned))
    return carried


def _evaluate(model, tokenizer, specs: list[str], seq_len: int, max_windows: int | None, progress: bool) -> list[dict]:
    return [perplexity(model, tokenizer, spec, seq_len, max_windows=max_windows, progress=progress).to_dict()
            for spec in specs]


@dataclass
class StepOptions:
    """What align and train share besides the training settings."""

    data: str = "builtin:pydoc"
    eval_data: list[str] = field(default_factory=list)  # held-out perplexity after training
    eval_seq_len: int = 256
    max_windows: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def check(self) -> None:
        """The data and evaluation after training, checked before anything loads (the evaluation would
        otherwise fail only once the training is done)."""
        EvalSettings(data=None, seq_len=self.eval_seq_len, max_windows=self.max_windows).check()
        load_examples(self.data, default_split="train")
        for spec in self.eval_data:
            load_examples(spec, default_split="eval")

    def run(self, command: str, out: Path, training: TrainSettings,
            model_spec: str, *, lora: LoraSettings | None = None,
            quant: str | None = None, checks=(), log: Callable[[str], None] = print, lr: float) -> Run:
        """The lifecycle of a LoRAM step that trains on `model_spec`, at `lr` unless `training` names one."""
        options = RunOptions(training=training, lora=lora or LoraSettings(), dtype=self.dtype, device=self.device,
                             quant=quant, overwrite=self.overwrite, resume=self.resume, progress=self.progress)
        seq_lens = {"TrainSettings.seq_len": training.seq_len} | (
            {"EvalSettings.seq_len": self.eval_seq_len} if self.eval_data else {})
        return Run(command, out, options, log=log, model=model_spec, seq_lens=seq_lens,
                   checks=[*checks, self.check], lr=lr)

    def evaluate(self, run: Run, model, tokenizer) -> dict:
        """Held-out perplexity on every --eval-data after training."""
        return {"perplexity": [perplexity(model, tokenizer, spec, self.eval_seq_len, max_windows=self.max_windows,
                                          progress=self.progress).to_dict() for spec in self.eval_data]}


def align(pruned: Path, out: Path, training: TrainSettings, step: StepOptions,
          log: Callable[[str], None] = print, distill: DistillSettings | None = None) -> dict:
    """Step 2: full-parameter training of the pruned model (done once, by a publisher).

    With distillation (the default, `DistillSettings.enabled` None or True) the pruned model learns the
    full model's next-token distributions on the corpus, the full model loaded a second time as the
    teacher (alpha 1 by default: the distributions alone), so that it behaves like the model the
    adapter will be served on. Without, it is the paper's continued pre-training (next-token loss).
    """
    pruned = Path(pruned)
    carried = _source_fields(pruned)
    distill = (distill or DistillSettings()).resolved("loram-align")
    teacher_spec = carried.get("source_model")

    def check_teacher() -> None:
        distill.check_model_teacher("alignment")
        if distill.enabled and not teacher_spec:
            raise SettingError("DistillSettings.enabled", f"'{pruned}' does not record the model it was pruned "
                               "from, the teacher of distilled alignment; align with DistillSettings.enabled off")

    run = step.run("loram align", out, training, str(pruned), checks=[check_teacher], log=log, lr=ALIGN_LR)
    training = run.options.training  # its learning rate decided
    model, tokenizer = run.load(str(pruned), seq_lens=[training.seq_len])
    blocks, mask = load_blocks(step.data, tokenizer, training.seq_len, default_split="train")
    for param in model.parameters():
        param.requires_grad_(True)
    hooks = None
    if not carried["loram"].get("structured", True):
        from .sparsity import KeepZeros

        hooks = KeepZeros.from_zeros(model)  # full training must not revive the pruned weights
    teacher, held = None, {}
    if distill.enabled:  # the full model, loaded a second time or cached (DistillSettings.cache)
        teacher, held = model_teacher(teacher_spec, distill, blocks, dtype=step.dtype, accelerator=run.accelerator,
                                      seq_len=training.seq_len, batch_size=training.batch_size, log=run.log)
    trained = run.train(model, blocks, mask, hooks=hooks, teacher=teacher, distill=distill)
    if trained.distill:
        trained.distill |= held
    del teacher
    model = trained.model
    if model is None:  # FSDP: the main process holds the gathered model, evaluates and saves it
        return run.leave()
    for param in model.parameters():
        param.requires_grad_(False)
    return run.finish(model, tokenizer, source=str(pruned), **carried, data=step.data,
                      alignment={"objective": "distillation" if distill.enabled else "next-token loss",
                                 "distill": asdict(distill)},
                      training=trained.record(training), results=step.evaluate(run, model, tokenizer),
                      parameters={"after": count_parameters(model)})


def train_adapter(model_spec: str, out: Path, training: TrainSettings, lora: LoraSettings, step: StepOptions,
                  quant: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Step 3: a LoRA on `model_spec` (the pruned or aligned model; or the full model, for the
    baseline), saved as a PEFT adapter directory with prunetune.json."""

    def check_quant() -> None:
        if quant not in QUANT_BITS:
            raise UserError(f"unknown --quant '{quant}'; use {' or '.join(q for q in QUANT_BITS if q)}")

    run = step.run("loram train", out, training, model_spec, lora=lora, quant=quant, checks=[check_quant], log=log,
                   lr=LORA_LR)
    training = run.options.training  # its learning rate decided
    carried = _source_fields(Path(model_spec)) if (Path(model_spec) / "prunetune.json").is_file() else {}
    if "architecture" in carried:  # an adapter directory is not a model: keep only what the report draws from
        shapes = carried.pop("architecture").get("source_layer_shapes")
        if shapes:
            carried["architecture"] = {"source_layer_shapes": shapes}
    model, tokenizer = run.load(model_spec, quant=quant, seq_lens=[training.seq_len])
    blocks, mask = load_blocks(step.data, tokenizer, training.seq_len, default_split="train")
    params = count_parameters(model)
    if not carried.get("loram", {}).get("structured", True):  # unst/semi: the zeros do not count
        from .sparsity import sparsity_summary

        params["nonzero"] = sparsity_summary(model)["parameters"]["nonzero"]
    torch.manual_seed(training.seed)  # the adapter's initialisation depends on the seed alone
    model = add_lora(model, lora)
    trained = run.train(model, blocks, mask)
    model = trained.model
    if model is None:  # FSDP: the main process holds the gathered adapter, evaluates and saves it
        return run.leave()
    # the full model's size: from the pruning record, or this model itself (the full-model baseline)
    original = carried.get("loram", {}).get("original_parameters", params["total"])
    return run.finish(
        model, tokenizer, as_adapter=True,
        base_model=model_spec, **carried, data=step.data, quant=quant,
        lora=asdict(lora.resolved()), training=trained.record(training), results=step.evaluate(run, model, tokenizer),
        parameters={"base": params, "original": original,
                    "reduction_ratio": reduction_ratio(original, params.get("nonzero", params["total"]),
                                                       QUANT_BITS[quant])},
    )


def recover(adapter: Path, pruned: Path, full_spec: str, out: Path, *, merge: bool = False, overwrite: bool = False,
            dtype: str = "auto", export: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Step 4: the adapter at the full model's shapes (a PEFT adapter directory), or with `merge` the
    full model with it merged. Structured pruning: trained B rows / A columns go back to their
    original positions, zeros elsewhere. Unstructured / 2:4: the shapes never changed, so the adapter
    is re-targeted unchanged (the pruned weights come back in the full model)."""
    from .recover import (merge_into, read_adapter, read_pruned_run, recover_adapter, recover_identity,
                          recover_tensors_and_config)

    adapter, pruned, full_spec = Path(adapter), Path(pruned), str(full_spec)
    carried = _source_fields(pruned)
    structured = carried["loram"].get("structured", True)

    def check_inputs() -> None:  # the recovery itself, in memory: an adapter that does not fit fails here
        resolve_model_spec(full_spec)  # a mistyped --full fails here rather than being written into the adapter
        tensors, config = read_adapter(adapter)
        if structured:
            pruned_run = read_pruned_run(pruned)
            _check_full_model(full_spec, pruned_run.full)
            recover_tensors_and_config(tensors, config, pruned_run.kept, pruned_run.full)

    options = RunOptions(dtype=dtype, device="cpu", overwrite=overwrite, export=export if merge else None)
    run = Run("loram recover", out, options, checks=[check_inputs], log=log, accelerate=False)

    def write_adapter(directory: Path) -> None:
        if structured:
            pruned_run = read_pruned_run(pruned)
            recover_adapter(adapter, pruned_run.kept, pruned_run.full, directory, full_spec)
        else:
            recover_identity(adapter, directory, full_spec)

    fields = dict(adapter=str(adapter), pruned=str(pruned), full_model=full_spec, loram=carried["loram"], merged=merge,
                  structured=structured,
                  recovery="B rows of q,k,v,gate,up and A columns of o,down back at their original positions, "
                           "zero elsewhere" if structured else "unchanged: the pruned weights keep their shapes")
    if not merge:
        return run.finish(None, None, as_adapter=True, write=write_adapter, **fields)
    model, tokenizer = run.load(full_spec)
    with tempfile.TemporaryDirectory(prefix="prunetune-recovered-") as staging:
        write_adapter(Path(staging))
        model = merge_into(model, staging)
    log(f"merged the recovered adapter into {full_spec}")
    return run.finish(model, tokenizer, **fields)


def _check_full_model(full_spec: str, full) -> None:
    """Where the full model is a local directory, its config must match the shapes pruning started from."""
    config_file = Path(full_spec) / "config.json"
    if not config_file.is_file():
        return  # a hub id, .gguf or built-in alias: loading it would cost the whole model; PEFT checks at load
    from transformers import AutoConfig

    from .recover import FullShapes

    shapes = FullShapes.of(AutoConfig.from_pretrained(full_spec))
    if shapes.layers != full.layers or shapes.hidden != full.hidden:
        raise UserError(f"'{full_spec}' is not the model this adapter's pruned model came from (its layer shapes "
                        "differ from those recorded when pruning); pass --full the source model")
