"""benchmarks/gpu.sh, the one command for the day a GPU is lent, checked on its CPU path (tiny shapes):
every step runs and the one JSON file holds each part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_runs_every_step_on_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], capture_output=True, text=True,
                          env=dict(os.environ, GPU_SH_QUICK="1", PYTHON=sys.executable), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"criterion", "speed", "plan_check", "loraprune_steps"}
    assert result["plan_check"]["met"] and result["plan_check"]["rows"]
    assert result["loraprune_steps"]["steps_per_second"] > 0
