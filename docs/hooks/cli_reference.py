"""MkDocs hook: fill docs/cli.md with the CLI reference, generated from the Typer app at build time.

Typer's own generator (`typer MODULE utils docs`) walks the same Click command tree that `--help`
prints, so the page cannot drift from `prunetune CMD --help`. It runs in a subprocess of this Python
(the venv mkdocs runs in), and any failure stops the build instead of leaving an empty page.
(mkdocs-typer2 was tried: its native engine fails on Typer 0.29's parameters, and its subprocess
engine renders nothing, without an error, when the command fails.)
"""

from __future__ import annotations

import re
import subprocess
import sys

from mkdocs.exceptions import PluginError

PAGE = "cli.md"
MARKER = "<!-- cli-reference -->"


def _typer_docs() -> str:
    command = [sys.executable, "-m", "typer", "prunetune.cli", "utils", "docs", "--name", "prunetune"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise PluginError(f"{' '.join(command[1:])} failed:\n{result.stderr}")
    return result.stdout


def _for_the_page(text: str) -> str:
    """One heading level down (the page has its own title); each example command in a code block."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            line = "#" + line
        elif not in_fence and re.match(r"prunetune\s", line):
            line = f"```console\n$ {line}\n```"
        lines.append(line)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} line, where the CLI reference goes")
    return markdown.replace(MARKER, _for_the_page(_typer_docs()))
