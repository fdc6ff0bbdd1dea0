"""The results pages (docs/results/*.md) are what each benchmark's `--report` makes of the committed
results, byte for byte, so a page cannot drift from its numbers; the reports read JSON only (no torch,
no model), and the committed results stay small summaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
DOCS = ROOT / "docs" / "results"
sys.path.insert(0, str(BENCHMARKS))
import _report  # noqa: E402  (benchmarks/_report.py)

# Runs a script's --report as `python benchmarks/SCRIPT.py` would, then checks it imported no torch.
RUN_REPORT = """
import runpy, sys
script, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
sys.argv = [script, "--report", "--out-dir", out]
runpy.run_path(script, run_name="__main__")
heavy = sorted(m for m in ("torch", "transformers", "prunetune") if m in sys.modules)
assert not heavy, f"--report imported {heavy}"
"""


@pytest.mark.parametrize("script", list(_report.PAGES))
def test_report_writes_the_committed_page(script, tmp_path):
    done = subprocess.run([sys.executable, "-c", RUN_REPORT, str(BENCHMARKS / f"{script}.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    written = (tmp_path / f"{script}.md").read_text()
    assert written == (DOCS / f"{script}.md").read_text(), (
        f"docs/results/{script}.md differs from `python benchmarks/{script}.py --report`; rerun it and commit the page")
    assert "- command: `" in written and "- machine: " in written and "- date: " in written


def test_index_lists_every_page_and_nothing_else():
    assert (DOCS / "index.md").read_text() == _report.index()
    assert {p.name for p in DOCS.glob("*.md")} == {"index.md"} | {f"{script}.md" for script in _report.PAGES}


def test_every_results_file_has_a_page():
    stems = {"loram_cells": "loram"}  # results file -> the script that reports it, where the names differ
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert stems.get(path.stem, path.stem) in _report.PAGES, f"{path.name} has no --report page"


def test_committed_results_are_small_summaries():
    """Per-step histories and per-unit index lists stay in the run directories."""
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        text = path.read_text()
        assert len(text) < 256 * 1024, f"{path.name} is {len(text):,} bytes"
        assert '"history"' not in text and '"kept"' not in text, path.name


def test_report_is_the_same_from_any_directory(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--report", "--out-dir", "pages"],
                   check=True, capture_output=True, cwd=tmp_path)
    assert (tmp_path / "pages" / "quality.md").read_bytes() == (DOCS / "quality.md").read_bytes()
