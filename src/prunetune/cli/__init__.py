"""The `prunetune` command: parse, call the API, print. No logic lives here.

One module per command group: pruning (prune, masks-agree), evaluation (eval, info, bench,
bench-criterion, report), loram (the `loram` group), sheared (shear, train), exporting (export,
and the --export option the training commands share) and planning (plan). None of them imports torch at module level,
so --help and argument errors answer at once. Options several commands share are declared once in
options.py; flags.py words the core's errors (which name settings, not flags) with the flags.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import typer

from ..errors import UserError
from . import evaluation, exporting, loram, planning, pruning, sheared
from .flags import as_flags

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make Hugging Face decoder LLMs smaller and cheaper to adapt: structured pruning and LoRA.",
)
app.add_typer(pruning.commands)
app.add_typer(evaluation.commands)
app.add_typer(loram.commands, name="loram")
app.add_typer(sheared.commands)
app.add_typer(exporting.commands)
app.add_typer(planning.commands)


def _quiet_libraries() -> None:
    # Through the environment, read when transformers and huggingface_hub are first imported: importing
    # them here would cost --help and every argument error seconds.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what transformers' disable_progress_bar() sets
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and abort classes of click and of the copy of click that newer typer vendors."""
    usage, abort = [click.ClickException], [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        usage.append(vendored.ClickException)
        if hasattr(vendored, "Abort"):
            abort.append(vendored.Abort)
    return tuple(usage), tuple(abort)


def main() -> None:
    """Entry point: user mistakes become one `error:` line (settings worded as the flags that set them)
    and exit code 2; bugs keep tracebacks."""
    _quiet_libraries()
    usage_errors, aborts = _click_exception_types()
    try:
        result = app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {as_flags(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except aborts:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except usage_errors as exc:
        if getattr(exc, "exit_code", 2) == 0:  # `prunetune` alone prints help by raising a 0-code error
            sys.exit(0)
        print(f"error: {exc.format_message()} (see --help)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        _leave_process_group()
    sys.exit(result if isinstance(result, int) else 0)


def _leave_process_group() -> None:
    """Under `accelerate launch`, close the process group before the interpreter exits: left to teardown,
    its threads can abort the process ("terminate called without an active exception") after a run that
    succeeded."""
    torch = sys.modules.get("torch")  # never imported just for this: --help stays fast
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


