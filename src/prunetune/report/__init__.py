"""Run directories and what is written into them: prunetune.json, report.md and its plots."""

from .markdown import add_evaluation, compare_runs, is_run_directory, read_record, write_report
from .rundir import (
    EXTRAS_DIR,
    check_output_dir,
    extra_file,
    markdown_table,
    provenance,
    replace_file,
    run_directory,
    write_json,
)

__all__ = ["EXTRAS_DIR", "add_evaluation", "check_output_dir", "extra_file", "compare_runs", "is_run_directory",
           "markdown_table", "provenance", "read_record", "replace_file", "run_directory", "write_json", "write_report"]
