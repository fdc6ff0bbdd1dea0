"""`prunetune loram run`: LoRAM end to end, and the comparison that says whether it paid off.

prune -> align -> train -> recover, each step the same command a user would type, run in its own
process so that every training's peak memory is its own (and a failing step leaves its own
message). Then, on held-out in-domain and out-of-domain text:

    full model, untouched
    full model + recovered adapter        (what LoRAM serves)
    pruned model + its adapter            (the ablation "without recovery")
    full model + adapter trained without alignment, recovered   (--ablation)
    full model + LoRA trained on it directly, same steps        (--baseline)

with the peak memory and time of each training run and the parameter reduction ratio.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ...data import load_examples
from ...errors import SettingError, UserError
from ...evaluate.perplexity import perplexity
from ...models import check_model, load_model
from ...report import (
    check_output_dir,
    markdown_table,
    provenance,
    read_record,
    replace_file,
    run_directory,
    write_json,
)
from ...structure.allocate import parse_layers
from ...runs.settings import EvalSettings, RunOptions
from ...training.loop import TrainSettings
from ...training.rates import ALIGN_LR, LORA_LR
from ...training.lora import LoraSettings
from ...training.distill import DistillSettings
from .pipeline import (QUANT_BITS, LoramPruneSettings, StepOptions, align, prune_for_loram, recover, train_adapter)


@dataclass
class LoramRunSettings:
    ratio: float = 0.5
    method: str = "stru"
    criterion: str | None = None
    layers: str | None = None  # see LoramPruneSettings
    align_data: str = "builtin:pydoc"
    align_steps: int = 100
    align_lr: float = ALIGN_LR  # distilled alignment, measured (training/rates.py)
    align_distill: bool = True  # align by distillation from the full model; False: next-token loss (the paper)
    data: str = "builtin:stdlib-code"
    ood_data: str | None = None  # default: the other built-in domain
    steps: int = 100
    lr: float = LORA_LR
    batch_size: int = 4
    seq_len: int = 256
    quant: str | None = None
    gradient_checkpointing: bool = False
    baseline: bool = False
    ablation: bool = False
    eval_seq_len: int = 256
    max_windows: int | None = None
    seed: int = 0

    @property
    def out_of_domain(self) -> str:
        if self.ood_data:
            return self.ood_data
        return "builtin:pydoc" if self.data.split("@")[0] != "builtin:pydoc" else "builtin:stdlib-code"

    def check(self) -> None:
        # the prune step's own checks, so that they fail now rather than in its process, worded with
        # this class's fields of the same names
        try:
            LoramPruneSettings(method=self.method, ratio=self.ratio, criterion=self.criterion,
                               layers=self.layers).check()
        except SettingError as exc:
            raise SettingError(exc.setting.replace("LoramPruneSettings.", "LoramRunSettings."),
                               str(exc).replace("LoramPruneSettings.", "LoramRunSettings.")) from None
        for name, least in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("align_steps", 0)):
            if getattr(self, name) < least:
                raise SettingError(f"LoramRunSettings.{name}",
                                   f"LoramRunSettings.{name} must be at least {least}, got {getattr(self, name)}")
        if self.align_steps == 0 and self.ablation:
            raise SettingError("LoramRunSettings.ablation", "LoramRunSettings.ablation adds an adapter trained "
                               "without alignment; with LoramRunSettings.align_steps 0 the adapter already is that one")
        for name in ("lr", "align_lr"):
            if getattr(self, name) <= 0:
                raise SettingError(f"LoramRunSettings.{name}",
                                   f"LoramRunSettings.{name} must be positive, got {getattr(self, name)}")
        if self.quant not in QUANT_BITS:
            raise SettingError("LoramRunSettings.quant", f"unknown LoramRunSettings.quant '{self.quant}'; use "
                               f"{' or '.join(q for q in QUANT_BITS if q)}")
        EvalSettings(data=None, seq_len=self.eval_seq_len, max_windows=self.max_windows).check()
        for spec in (self.align_data, self.data, self.out_of_domain):
            load_examples(spec, default_split="train")  # a bad data spec fails before any work


def _step_main(connection, function, args: tuple, kwargs: dict) -> None:
    """A step's own process: run the Python API function; a user's mistake goes back as its message."""
    try:
        function(*args, **kwargs)
    except UserError as exc:
        connection.send(str(exc))
        sys.exit(2)
    connection.send(None)


def _portable(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` if it can travel to another process (a module's function), else print."""
    try:
        pickle.dumps(log)
    except (pickle.PicklingError, AttributeError, TypeError):
        return print
    return log


def _run_step(name: str, function: Callable, *args, log: Callable[[str], None], **kwargs) -> None:
    """Run one step (a function of pipeline.py) in a fresh process, so that every training's peak memory
    is its own; a failing step's message comes back as this run's error."""
    from ...measure import MMAP_THRESHOLD

    log(f"== {name}")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no memory inherited from this one
    receive, send = context.Pipe(duplex=False)
    # Large blocks straight from mmap, so memory freed after loading leaves the process and each
    # training's peak RSS is its own (as in `prunetune bench`); glibc reads this when a process starts.
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    try:
        process = context.Process(target=_step_main, args=(send, function, args, kwargs | {"log": _portable(log)}))
        process.start()
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    send.close()
    try:
        message = receive.recv()  # None when it succeeded
    except EOFError:  # it ended without a word: a crash, whose traceback it printed
        message = None
    process.join()
    if process.exitcode != 0:
        raise UserError(f"the {name} step failed: {message}" if message
                        else f"the {name} step failed (exit {process.exitcode}); its message is above")


def loram_run(model_spec: str, out: Path, s: LoramRunSettings, *, overwrite: bool = False,
              log: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    out = Path(out)
    s.check()
    check_output_dir(out, overwrite)
    config = check_model(model_spec, {"LoramRunSettings.seq_len": s.seq_len,
                                      "LoramRunSettings.eval_seq_len": s.eval_seq_len})
    if s.layers:
        parse_layers(s.layers, config.num_hidden_layers, "LoramRunSettings.layers")

    def training(steps: int, lr: float) -> TrainSettings:
        return TrainSettings(steps=steps, lr=lr, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed,
                             gradient_checkpointing=s.gradient_checkpointing)

    with run_directory(out, overwrite) as tmp:
        _run_step("prune", prune_for_loram, model_spec, tmp / "pruned",
                  LoramPruneSettings(method=s.method, ratio=s.ratio, criterion=s.criterion, layers=s.layers,
                                     data=s.align_data, seed=s.seed), RunOptions(), log=log)
        if s.align_steps:
            _run_step("align", align, tmp / "pruned", tmp / "aligned", training(s.align_steps, s.align_lr),
                      StepOptions(data=s.align_data), log=log, distill=DistillSettings(enabled=s.align_distill))
        trained = {"adapter": _trained_on(tmp, s)}
        if s.ablation:
            trained["adapter-unaligned"] = tmp / "pruned"
        for name, base in trained.items():
            _run_step(f"train ({name})", train_adapter, str(base), tmp / name, training(s.steps, s.lr), LoraSettings(),
                      StepOptions(data=s.data), quant=s.quant, log=log)
            _run_step(f"recover ({name})", recover, tmp / name, base, model_spec, tmp / f"full-{name}", log=log)
        if s.baseline:
            _run_step("baseline", train_adapter, model_spec, tmp / "baseline", training(s.steps, s.lr), LoraSettings(),
                      StepOptions(data=s.data), log=log)
        log("== evaluation")
        rows = _compare(model_spec, tmp, s)
        record = provenance("loram run", source_model=model_spec, settings=asdict(s) | {"ood_data": s.out_of_domain},
                            comparison=rows,
                            reduction_ratio=read_record(tmp / "adapter")["parameters"]["reduction_ratio"],
                            elapsed_seconds=round(time.perf_counter() - started, 1))
        write_json(tmp / "prunetune.json", record)
        replace_file(tmp / "report.md", run_report(record))
    return record


def _trained_on(tmp: Path, s: LoramRunSettings) -> Path:
    """The pruned model the LoRAM adapter trains on: aligned, or as pruned with --align-steps 0."""
    return tmp / "aligned" if s.align_steps else tmp / "pruned"


def _perplexities(model, tokenizer, s: LoramRunSettings) -> dict:
    return {key: perplexity(model, tokenizer, f"{spec.split('@')[0]}@eval", s.eval_seq_len,
                            max_windows=s.max_windows).perplexity
            for key, spec in (("in_domain", s.data), ("out_of_domain", s.out_of_domain))}


def _training(adapter: Path) -> dict:
    training = read_record(adapter)["training"]
    return {"peak_memory_bytes": training["peak_memory_bytes"], "train_seconds": training["seconds"],
            "peak_memory_kind": training["peak_memory_kind"]}


def _compare(model_spec: str, tmp: Path, s: LoramRunSettings) -> list[dict]:
    from ...families.adapters import load_peft

    rows = []
    full, tokenizer = load_model(model_spec)
    rows.append({"configuration": "full model, untouched"} | _perplexities(full, tokenizer, s))
    adapters = [("full model + recovered LoRAM adapter", "full-adapter", "adapter")]
    if s.ablation:
        adapters.append(("full model + recovered adapter trained without alignment", "full-adapter-unaligned",
                         "adapter-unaligned"))
    if s.baseline:
        adapters.append(("full model + LoRA trained on it (baseline)", "baseline", "baseline"))
    for label, directory, trained in adapters:
        wrapped = load_peft(full, tmp / directory)
        rows.append({"configuration": label} | _perplexities(wrapped, tokenizer, s) | _training(tmp / trained))
        full = wrapped.unload()  # the same full model, adapter taken off, for the next one
    pruned, pruned_tokenizer = load_model(str(_trained_on(tmp, s)))
    wrapped = load_peft(pruned, tmp / "adapter")
    rows.append({"configuration": "pruned model + its adapter (without recovery)"}
                | _perplexities(wrapped, pruned_tokenizer, s) | _training(tmp / "adapter"))
    return rows


def run_report(record: dict) -> str:
    s = record["settings"]
    rows = record["comparison"]
    untouched = rows[0]
    baseline = next((r for r in rows if "baseline" in r["configuration"]), None)
    header = ["configuration", f"ppl {s['data']} (in-domain)", f"ppl {s['ood_data']} (out-of-domain)",
              "training peak GiB", "training s"]
    if baseline:
        header += ["share of the baseline's gain", "memory vs baseline"]
    table = []
    for r in rows:
        line = [r["configuration"], f"{r['in_domain']:.3f}", f"{r['out_of_domain']:.3f}",
                f"{r['peak_memory_bytes'] / 2**30:.2f}" if "peak_memory_bytes" in r else "–",
                f"{r['train_seconds']:.0f}" if "train_seconds" in r else "–"]
        if baseline:
            gain = untouched["in_domain"] - baseline["in_domain"]
            share = (untouched["in_domain"] - r["in_domain"]) / gain if gain else float("nan")
            memory = r["peak_memory_bytes"] / baseline["peak_memory_bytes"] if "peak_memory_bytes" in r else None
            line += [f"{share:.0%}", "–" if memory is None else f"{memory:.0%}"]
        table.append(line)
    return "\n".join([
        f"# prunetune loram run: {record['source_model']}", "",
        f"Created {record['created']} on {record['device']}; took {record['elapsed_seconds']:.0f} s. "
        f"{s['method']} pruning at ratio {s['ratio']}, "
        + (f"aligned {s['align_steps']} steps on {s['align_data']} "
           f"({'by distillation from the full model' if s.get('align_distill') else 'by next-token loss'}), "
           if s["align_steps"] else "not aligned, ")
        + f"LoRA trained {s['steps']} steps on {s['data']}" + (f" on an {s['quant']} base" if s["quant"] else "")
        + f"; parameter reduction ratio {record['reduction_ratio']:.2f}x.", "",
        markdown_table(header, table), "",
        "Perplexity on the held-out (eval) split of each domain, "
        f"non-overlapping {s['eval_seq_len']}-token windows. Peak memory is each training run's own "
        f"({rows[1].get('peak_memory_kind', '')}). The step directories (pruned, aligned, adapter, full-adapter, "
        "...) each hold their own prunetune.json and report.md.", "",
    ])
