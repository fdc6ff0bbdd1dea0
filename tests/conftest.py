"""What every test shares: offline settings, the tests' own modules on sys.path, the CLI's model-load
refusal, and the tiny saved models (built once per test run, read by every file that needs one)."""

import os
import sys

import pytest

# The hub is out of reach in CI; fail fast instead of retrying the network. These are read when the
# libraries are first imported, so they come first. The last two are what the CLI sets for the libraries
# (prunetune.cli._quiet_libraries), and helpers.run_cli runs it in this process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Under pytest-xdist (`make test`) every worker gets one thread, and so do the CLI processes it
# starts: two workers with two threads each would fight over the two cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# tiny.py, helpers.py and the *_run.py scripts that tests start in a process of their own.
sys.path.insert(0, os.path.dirname(__file__))
pytest.register_assert_rewrite("helpers")  # their asserts explain themselves too

from helpers import REFUSE_ENV, snapshot  # noqa: E402
from tiny import WIDE, save_tiny_model_dir  # noqa: E402


@pytest.fixture
def no_model_load(monkeypatch):
    """Every `run_cli` of the test fails loudly if it loads a model: a bad input is reported first."""
    monkeypatch.setenv(REFUSE_ENV, "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(arch="llama", **overrides)`: `tiny.save_tiny_model_dir`'s model directory (a tiny
    random model of `tiny.tiny_config(arch, **overrides)` with the real SmolLM2 tokenizer), saved once per
    test run for each architecture and shape. Tests share it: read it, and copy it before changing it;
    the end of the run checks that no test wrote into one."""
    built: dict[tuple, tuple] = {}

    def get(arch: str = "llama", **overrides):
        key = (arch, repr(sorted(overrides.items())))
        if key not in built:
            directory = save_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{arch}") / "model", arch, **overrides)
            built[key] = directory, snapshot(directory)
        return built[key][0]

    yield get
    for directory, saved in built.values():
        assert snapshot(directory) == saved, f"a test changed the shared model directory {directory}"


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir):
    """The tiny random Llama (hidden 96, 4 layers, 6 heads in 3 key/value groups, 48 MLP channels, 128
    positions) with the real SmolLM2 tokenizer (vocab 49152)."""
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def wide_model_dir(tiny_model_dir):
    """`model_dir` at hidden 128 with 8 heads in 4 key/value groups and 128 MLP channels, so NF4's CPU
    kernels apply."""
    return tiny_model_dir("llama", **WIDE)


@pytest.fixture(scope="session")
def short_text(tmp_path_factory):
    """A .txt file of builtin:pydoc's first training documents, about 6,000 characters (some sixty
    32-token training rows): for tests whose cost grows with the corpus, such as building a teacher
    cache over every row."""
    from prunetune.data import load_examples

    text = "\n\n".join(example.response for example in load_examples("builtin:pydoc"))[:6000]
    path = tmp_path_factory.mktemp("data") / "short.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)
