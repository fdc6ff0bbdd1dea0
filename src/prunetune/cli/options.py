"""Every option more than one command takes, declared once: one name, one meaning, one syntax and one
default wherever it appears (tests/cli/test_cli_flags.py holds every command to that).

Each function returns the `typer.Option` a command's parameter defaults to, e.g.
`steps: int = options.steps()`. Where a command must start from another default (inference
batches of one, a full-parameter learning rate), it passes that default and a `why`, and the help
says so. Nothing here imports torch: `--help` and argument errors answer at once.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from ..training.rates import LORA_LR

MODEL_HELP = "Hub id, local model directory, .gguf file, or the built-in 'smollm2-135m'."

# The measured defaults, each with the measurement behind it (README).
LR_BY_SIZE = ("5e-4 was measured on SmolLM2-135M (the README's LoRAPrune quality table and LoRAM benchmark); "
              "LoRA on 7B-class models usually wants less (LLM-Pruner tuned LLaMA-7B at 1e-4).")


def _help(text: str, why: str | None) -> str:
    return f"{text} {why}" if why else text


def _option(default: Any, flag: str, text: str, why: str | None = None, **kwargs) -> Any:
    return typer.Option(default, flag, help=_help(text, why), **kwargs)


# ---------------------------------------------------------------------------------------------
# Output, loading, reproducibility


def out(text: str = "Output directory (written beside, renamed when complete).") -> Any:
    return typer.Option(..., "--out", help=text)


def overwrite() -> Any:
    return _option(False, "--overwrite/--no-overwrite", "Replace --out if it exists.")


def dtype(default: str = "auto", why: str | None = None) -> Any:
    return _option(default, "--dtype", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.", why)


def device() -> Any:
    return _option("auto", "--device", "auto, cpu, cuda or cuda:N.")


def quant(why: str | None = None) -> Any:
    return _option(None, "--quant", "Load the frozen base quantized with bitsandbytes: 8bit or nf4 (NF4 with "
                   "double quantization: QLoRA, QLoRAM).", why)


def seed(what: str = "data order and LoRA's initialisation") -> Any:
    return _option(0, "--seed", f"Seed of every random draw ({what}).")


def json_path(what: str = "the result") -> Any:
    return typer.Option(None, "--json", help=f"Also write {what} to this JSON file.")


# ---------------------------------------------------------------------------------------------
# Training


def steps(default: int = 100, why: str | None = None) -> Any:
    return _option(default, "--steps", "Optimizer steps.", why)


def batch_size(default: int = 4, why: str | None = None) -> Any:
    return _option(default, "--batch-size", "Sequences per micro-batch (per process).", why)


def grad_accum() -> Any:
    return _option(1, "--grad-accum", "Micro-batches per optimizer step.")


def seq_len(default: int = 256, why: str | None = None) -> Any:
    return _option(default, "--seq-len", "Tokens per training (or calibration) sequence.", why)


def lr(default: float = LORA_LR, why: str | None = LR_BY_SIZE) -> Any:
    shown = format(default, ".0e").replace("e-0", "e-")  # 5e-4, as the README writes it, not 0.0005
    return _option(default, "--lr", "Peak learning rate (AdamW, cosine schedule).", why, show_default=shown)


def warmup() -> Any:
    return _option(0.05, "--warmup", "Learning-rate warm-up, as a fraction of the steps.")


def max_grad_norm() -> Any:
    return _option(1.0, "--max-grad-norm", "Gradient clipping (0: off).")


def gradient_checkpointing() -> Any:
    return _option(False, "--gradient-checkpointing/--no-gradient-checkpointing",
                   "Trade compute for activation memory.")


def checkpoint_every() -> Any:
    return _option(0, "--checkpoint-every", "Save a resumable checkpoint every N steps (0: never).")


def resume() -> Any:
    return _option(False, "--resume/--no-resume", "Continue a killed run from its last checkpoint (same command).")


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_r() -> Any:
    return _option(8, "--lora-r", "LoRA rank.")


def lora_alpha() -> Any:
    return _option(16, "--lora-alpha", "LoRA alpha (the update is scaled by alpha / rank).")


def lora_dropout() -> Any:
    return _option(None, "--lora-dropout", "LoRA dropout: 0.05 unless set, 0 where LoRA also covers a mixture's "
                   "experts (PEFT gives those no dropout).", show_default=False)


def lora_dtype() -> Any:
    return _option("float32", "--lora-dtype", "LoRA weights in float32 (PEFT's default) or base (the model's "
                   "dtype, e.g. bf16: no casts, faster on a GPU).")


def adapter(text: str) -> Any:
    return _option(None, "--adapter", f"A PEFT adapter directory (save_pretrained's): {text}")


# ---------------------------------------------------------------------------------------------
# The before/after perplexity


def eval_data(default: Optional[str] = "builtin:pydoc", why: str | None = None) -> Any:
    return _option(default, "--eval-data", "Held-out perplexity data, one data spec (see `prunetune eval "
                   "--help`); its eval split unless it names one.", why, show_default=default is not None)


def no_eval() -> Any:
    return _option(False, "--no-eval", "Skip the --eval-data perplexity.")


def eval_seq_len() -> Any:
    return _option(256, "--eval-seq-len", "Perplexity window length in tokens.")


def max_windows() -> Any:
    return _option(None, "--max-windows", "Evaluate at most this many perplexity windows per data set.")


# ---------------------------------------------------------------------------------------------
# What is pruned, and how


LAYERS_TEXT = ("Layers to prune: all (stock-loadable result), paper (all but the first 10% and the last), "
               "or e.g. '3-27'.")


def layers(default: Optional[str] = None, why: str = "") -> Any:
    return _option(default, "--layers", LAYERS_TEXT, why, show_default=default is not None)


def ratio(default: float, why: str | None = None) -> Any:
    return _option(default, "--ratio", "Fraction of the prunable parameters to remove, in (0, 1).", why)


def units(default: str | None = None) -> Any:
    unset = ("" if default else " Unset: heads,channels, or on a mixture of experts heads,experts,expert-channels "
             "(experts,expert-channels on OLMoE, whose heads stay).")
    return _option(default, "--units", "Unit kinds to prune, comma-separated: heads, channels, layers "
                   "(whole decoder layers, by block influence; with heads or channels the split between depth and "
                   "width is the one with the lowest calibration loss); on a mixture of experts (Mixtral, "
                   "Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE) heads, experts and expert-channels instead of channels "
                   "(the split between them is measured the same way)." + unset, show_default=default is not None)


def head_unit() -> Any:
    return _option("kv-group", "--head-unit", "kv-group (a key/value head with its query heads) or q-head (equal "
                   "query heads per group).")


def round_to(default: str = "auto", why: str = "auto: 128 on MLPs 4096 or more wide, 64 on narrower ones.") -> Any:
    return _option(default, "--round-to", "Keep MLP channel counts a multiple of this (fast GPU shapes): auto or "
                   "a number (1: no rounding).", why)


def calib_samples() -> Any:
    return _option(10, "--calib-samples", "Calibration sequences (taylor, wanda-sp, wanda).")


def score() -> Any:
    return _option("abs", "--score", "LoRA-guided score: abs (official code) or square (paper).")


def normalize(why: str) -> Any:
    return _option("auto", "--normalize", "LoRA-guided scores: module (L2-normalise each module's unit scores: the "
                   "official code), model (one scale per step for the whole model, which keeps heads and channels "
                   "comparable), none, or auto:", why)


def distill(text: str) -> Any:
    return typer.Option(None, "--distill/--no-distill", show_default=False, help=text)


def distill_alpha(default: float | str) -> Any:
    return typer.Option(None, "--distill-alpha", show_default=False, help="--distill: weight of the distillation "
                        f"term; the language-model loss gets 1 - this (default: {default}).")


def distill_temperature() -> Any:
    return _option(1.0, "--distill-temperature", "--distill: softmax temperature of both sides.")


def teacher_cache() -> Any:
    return typer.Option(None, "--teacher-cache", show_default=False, help="--distill from a second model (full-"
                        "parameter shear/train, --recover-steps, loram align): read the teacher's top-k next tokens "
                        "from this directory instead of holding the model. The "
                        "first run builds it (one teacher pass over the training blocks, then the teacher is freed); "
                        "later runs on the same data reuse it.")


def teacher_top_k() -> Any:
    return _option(64, "--teacher-top-k", "--teacher-cache: next tokens kept per position (the rest of the "
                   "vocabulary counts as one outcome).")


# ---------------------------------------------------------------------------------------------
# Timing (bench, bench-criterion)


def warmup_runs(what: str = "runs") -> Any:
    return _option(2, "--warmup-runs", f"Untimed {what} before timing.")


def repeats(what: str = "runs") -> Any:
    return _option(5, "--repeats", f"Timed {what}; medians are reported.")


# ---------------------------------------------------------------------------------------------
# Sheared-LLaMA's domains (shear, train)


DOMAINS_DEFAULT = "code=builtin:stdlib-code,prose=builtin:pydoc"


def domains() -> Any:
    return _option(DOMAINS_DEFAULT, "--data", "Domains: name=SPEC,... (e.g. code=builtin:stdlib-code,"
                   "prose=builtin:pydoc) or a YAML file with data, initial weights, references and scaling-law "
                   "points.")


def weights() -> Any:
    return _option(None, "--weights", "Initial domain proportions, e.g. code=0.7,prose=0.3 (default: the YAML's, "
                   "or equal).")


def references() -> Any:
    return _option(None, "--references", "Reference losses, e.g. code=1.9,prose=2.2 (default: the source model's "
                   "own per-domain loss, or a scaling-law fit from the YAML).")


def dynamic() -> Any:
    return typer.Option(False, "--dynamic-loading/--fixed-mixture", help="Dynamic batch loading: re-weight the "
                        "domains by how far each lags its reference loss every --eval-every steps (--fixed-mixture: "
                        "keep the initial proportions).")


def eval_every() -> Any:
    return _option(10, "--eval-every", "Steps between per-domain validation losses (and weight updates).")


def eval_blocks() -> Any:
    return _option(8, "--eval-blocks", "Held-out sequences per domain for that validation loss.")


def eta() -> Any:
    return _option(1.0, "--eta", "Step size of the domain-weight update.")


def clamp() -> Any:
    return typer.Option(True, "--clamp/--no-clamp", help="Clamp the loss gap at zero (the paper); --no-clamp: the "
                        "official code.")


def train_lora(default: bool = False) -> Any:
    return typer.Option(default, "--lora/--no-lora", help="Train a LoRA (--lora-r, --lora-alpha) instead of every "
                        "weight (less memory); merged when saved.")
