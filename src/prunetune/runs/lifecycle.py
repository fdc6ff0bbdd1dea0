"""One run lifecycle for every command that writes a model or an adapter.

    run = Run(command, out, options, evaluation, checks=[...])   the method's checks, then the shared ones,
                                                                 all before any model loads; the accelerator
    model, tokenizer = run.load(spec)                             on the run's device, sequence lengths checked
    run.perplexity(model, tokenizer, "before")
    ... the method's own work: score, mask, train (run.train), cut ...
    if model is None: return run.leave()                          FSDP: only the main process writes
    run.perplexity(model, tokenizer, "after")
    return run.finish(model, tokenizer, method=..., settings=...)  provenance, the atomic run directory (save,
                                                                 extra files, prunetune.json, export, report,
                                                                 model card), the checkpoint removed

A method keeps only what is its own (what it scores, masks, trains and cuts); a feature every
output should have lands here once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from ..evaluate.perplexity import check_seq_len
from ..export import GGUF_FILE
from ..export.hf import save_model
from ..data import load_examples
from ..models import check_model, check_positions, load_model
from ..report import check_output_dir, extra_file, provenance, run_directory, write_json, write_report
from ..structure.units import Structure
from ..families.adapters import to_stock_layout
from ..training.loop import make_accelerator, train
from ..training.sharding import leave_to_main, refuse_quant_under_fsdp
from .card import write_card
from .settings import EvalSettings, RunOptions, checkpoint_dir_for


class Run:
    """The shared skeleton of a run; see the module docstring for its order."""

    def __init__(self, command: str, out: Path, options: RunOptions, evaluation: EvalSettings | None = None, *,
                 model: str | None = None, seq_lens: dict[str, int] | None = None,
                 checks: Iterable[Callable[[], object]] = (),
                 config_checks: Iterable[Callable[[object], object]] = (), log: Callable[[str], None] = print,
                 accelerate: bool = True, lr: float | None = None):
        """Check everything that can be checked without the weights, in the order a user meets it: the
        method's `checks`, the evaluation, the `model` spec (its config: it exists, its architecture is
        supported, its files are whole; kept as `self.config`), the method's `config_checks` (each given
        the config: a target shape, the layers to prune), every length in `seq_lens` against the model's
        positions, the load options and the output; then make the accelerator. A run that trains names
        its method's measured learning rate `lr` (training/rates.py): `options.training.lr` unset means it."""
        self.started = time.perf_counter()
        self.command = command
        self.out = Path(out)
        if lr is not None and options.training.lr is None:
            options = replace(options, training=replace(options.training, lr=lr))
        self.options = options
        self.evaluation = evaluation
        for check in checks:  # the method's own: its settings, its data, its model and shapes
            check()
        if evaluation is not None:
            evaluation.check()
            if evaluation.data:
                load_examples(evaluation.data, default_split="eval")
                seq_lens = (seq_lens or {}) | {"EvalSettings.seq_len": evaluation.seq_len}
        self.config = check_model(model) if model is not None else None
        for check in config_checks:
            check(self.config)
        if self.config is not None:
            check_positions(self.config, seq_lens)
        options.check()  # the training, the adapter and the loading options
        check_output_dir(self.out, options.overwrite)
        refuse_quant_under_fsdp(options.quant)
        self.accelerator = make_accelerator(options.training) if accelerate else None
        self.is_main = self.accelerator is None or self.accelerator.is_main_process
        self.log = log if self.is_main else (lambda _: None)
        self.results: dict = {}

    @property
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir_for(self.out)

    @property
    def device(self) -> str:
        if self.options.device != "auto" or self.accelerator is None:
            return self.options.device
        return str(self.accelerator.device)

    def load(self, spec: str, *, quant: str | None = None, seq_lens: Iterable[int] = ()):
        """The model and tokenizer, on the run's device; every length the run will use checked against it."""
        model, tokenizer = load_model(spec, dtype=self.options.dtype, device=self.device, quant=quant)
        for seq_len in seq_lens:
            check_seq_len(model, seq_len)
        if self.evaluation is not None and self.evaluation.data:
            check_seq_len(model, self.evaluation.seq_len)
        return model, tokenizer

    def perplexity(self, model, tokenizer, when: str) -> None:
        """The run's comparable perplexity ("before" or "after"), into the record's results."""
        if self.evaluation is not None and self.evaluation.data and self.is_main:
            self.results[f"perplexity_{when}"] = self.evaluation.measure(model, tokenizer, when, self.options.progress,
                                                                         self.log)

    def train(self, model, blocks, loss_mask, settings=None, **kwargs):
        """The shared training loop with this run's accelerator, checkpoint, resume and progress."""
        return train(model, blocks, loss_mask, settings or self.options.training, accelerator=self.accelerator,
                     checkpoint_dir=self.checkpoint_dir, resume=self.options.resume, progress=self.options.progress,
                     log=self.log, **kwargs)

    def leave(self) -> dict:
        """Under FSDP, a process other than the main one is done once training is: the main one writes."""
        return leave_to_main(self.accelerator)

    def finish(self, model, tokenizer, /, *, source_structure: Structure | None = None, as_adapter: bool = False,
               write: Callable[[Path], None] | None = None, extras: dict[str, Callable[[Path], None]] | None = None,
               **fields) -> dict:
        """Write the run directory and return its record (prunetune.json).

        `fields` are the method's part of the record; `results` defaults to the perplexities measured
        through this run (when it has an evaluation). The output is the model (LoRA merged, saved where
        stock loaders read it), the
        PEFT adapter with `as_adapter`, or whatever `write(directory)` writes. `source_structure`: the one the
        model was cut from, recorded beside the result's. `extras`: files no engine reads, by name
        (DIR/run/NAME), each written by its function."""
        if self.evaluation is not None:
            fields.setdefault("results", self.results)
        record = provenance(self.command, **fields)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        if self.is_main:
            with run_directory(self.out, self.options.overwrite) as tmp:
                if write is not None:
                    write(tmp)
                elif as_adapter:
                    model.save_pretrained(tmp)
                    to_stock_layout(tmp, model)  # Phi-3: adapts qkv_proj and gate_up_proj, as stock PEFT does
                    tokenizer.save_pretrained(tmp)
                else:
                    model, saved_as = save_model(model, tokenizer, tmp)
                    record["architecture"] = record.get("architecture", {}) | _architecture(model, saved_as,
                                                                                            source_structure)
                for name, write_extra in (extras or {}).items():
                    write_extra(extra_file(tmp, name))
                record["elapsed_seconds"] = round(time.perf_counter() - self.started, 1)
                write_json(tmp / "prunetune.json", record)
                if self.options.export and not as_adapter:
                    record["exports"] = [self._export(tmp)]
                    write_json(tmp / "prunetune.json", record)
                write_report(tmp)  # from the JSON just written, exactly as `prunetune report` redraws it
                write_card(tmp, record, adapter=as_adapter)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return record

    def _export(self, directory: Path) -> dict:
        """The finished model for llama.cpp/Ollama, written inside the run directory before it is renamed."""
        from ..export.gguf import write_gguf

        summary = write_gguf(str(directory), directory / GGUF_FILE, self.options.export, overwrite=True)
        self.log(f"wrote {self.out / GGUF_FILE} ({summary['architecture']}, {summary['outtype']}, "
                 f"{summary['bytes'] / 2**20:.0f} MiB)")
        return {"format": "gguf", **{k: v for k, v in summary.items() if k != "path"}, "file": GGUF_FILE}


def _architecture(model, saved_as: str, source: Structure | None) -> dict:
    after = Structure.of(model)
    architecture = ({"source": source.model_type} if source else {}) | {
        "saved_as": saved_as, "stock_loadable": after.uniform, "layer_shapes": [s.record() for s in after.layers]}
    if source:
        architecture |= {"source_layer_shapes": [s.record() for s in source.layers], "source_hidden": source.hidden}
    return architecture
