"""Fixtures for the checks against the real serving engines (`make test-serving`, in .venv-serving).

The outputs are made by the `prunetune` command itself, on the real SmolLM2-135M, once per session:
- `uniform_dir`: 20% pruned with every layer pruned (one shape for every layer: stock engines load it);
- `per_layer_dir`: LoRAPrune's default `--layers paper` output (the first 10% and the last layer stay
  whole, so the layers have different shapes), after a few training steps.
- `per_layer_heads_dir`: a per-layer output whose layers also differ in heads and key/value heads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PRUNETUNE = [sys.executable, "-m", "prunetune.cli"]
# Fixed prompts for the token-for-token checks (code and prose, like the built-in domains).
PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The quick brown fox jumps over the lazy dog. In the morning,",
    "import os\nimport sys\n\n\ndef main():\n",
    "Structured pruning removes whole attention heads and MLP channels, so that",
]


def prunetune(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([*PRUNETUNE, *args], check=True, env=env)


@pytest.fixture(scope="session")
def uniform_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "uniform20"
    prunetune("prune", "smollm2-135m", "--method", "magnitude", "--ratio", "0.2", "--layers", "all",
              "--no-eval", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def per_layer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "loraprune20"
    prunetune("prune", "smollm2-135m", "--method", "loraprune", "--ratio", "0.2", "--layers", "paper",
              "--steps", "4", "--batch-size", "1", "--seq-len", "64", "--no-eval", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def per_layer_heads_dir(tmp_path_factory) -> Path:
    """Per-layer shapes that differ in key/value heads too (the 20% outputs above prune only MLP
    channels): layers 3-28 keep 2 of 3 key/value groups and 1024 channels, the rest stay whole."""
    out = tmp_path_factory.mktemp("serving") / "heads34"
    prunetune("prune", "smollm2-135m", "--method", "magnitude", "--ratio", "0.34", "--layers", "paper",
              "--split", "heads-first", "--no-eval", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """PROMPTS, for test files that cannot import this conftest by name."""
    return list(PROMPTS)
