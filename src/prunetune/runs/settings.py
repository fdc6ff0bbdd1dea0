"""Settings every run shares, whatever its method: how it evaluates, loads, trains and writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SettingError
from ..evaluate.perplexity import perplexity
from ..training.loop import TrainSettings
from ..training.lora import LoraSettings


@dataclass
class EvalSettings:
    """The run's one comparable perplexity, before and after (None: skip it)."""

    data: str | None = "builtin:pydoc"
    seq_len: int = 256
    max_windows: int | None = None

    def check(self) -> None:
        """The one check of the evaluation's settings, for every command that evaluates (the data spec
        itself is read by the run, which knows its default split; the length against the model's
        positions needs its config)."""
        if self.max_windows is not None and self.max_windows < 1:
            raise SettingError("EvalSettings.max_windows",
                               f"EvalSettings.max_windows must be at least 1, got {self.max_windows}")
        if self.seq_len < 2:
            raise SettingError("EvalSettings.seq_len", f"EvalSettings.seq_len must be at least 2, got {self.seq_len}")

    def measure(self, model, tokenizer, when: str, progress: bool, log: Callable[[str], None]) -> dict:
        """The run's one comparable perplexity, logged as "perplexity WHEN"; as stored in prunetune.json."""
        result = perplexity(model, tokenizer, self.data, self.seq_len, max_windows=self.max_windows, progress=progress)
        log(f"perplexity {when}: {result.perplexity:.3f} ({result.seconds:.1f}s)")
        return result.to_dict()


@dataclass
class RunOptions:
    """How a run loads its model, trains and writes its output: the same for every method."""

    training: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dtype: str = "auto"
    device: str = "auto"
    quant: str | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    export: str | None = None  # also write DIR/model.gguf at this GGUF outtype (f32, f16, q8_0) when the run ends

    def check(self) -> None:
        """The training, the adapter's settings and the loading options (a CUDA device that is not
        there, an unknown dtype or quantization), before anything loads."""
        from ..models import check_load_options

        self.training.check()
        self.lora.check()
        check_load_options(self.dtype, self.device, self.quant)


def checkpoint_dir_for(out: Path) -> Path:
    """Where a run keeps its resumable checkpoint: a hidden sibling of the output, removed on success."""
    return out.parent / f".{out.name}.checkpoint"
