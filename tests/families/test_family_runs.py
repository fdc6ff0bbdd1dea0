"""`prunetune prune` end to end on every family, in process and tiny: LoRAPrune (two steps) and Taylor with
one recovery step; the written model loads back (stock transformers where every layer has one shape).
`make test-slow` runs these (about a minute); `make test` checks each family's adapter directly."""

import pytest
from tiny import FAMILIES, save_tiny_model_dir

from prunetune.methods.prune import PruneSettings, prune
from prunetune.runs.settings import EvalSettings, RunOptions
from prunetune.training.loop import TrainSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: save_tiny_model_dir(root / arch, arch) for arch in FAMILIES}


@pytest.mark.parametrize("method", ["loraprune", "taylor"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_prune_runs_and_writes_a_loadable_model(arch, method, sources, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunetune.models import load_model

    settings = PruneSettings(method=method, ratio=0.3, round_to=1, layers="all" if method == "taylor" else None,
                             recover_steps=1 if method == "taylor" else 0)
    options = RunOptions(training=TrainSettings(steps=2, batch_size=2, seq_len=16), progress=False)
    record = prune(str(sources[arch]), tmp_path / "out", settings, EvalSettings(data=None), options,
                   log=lambda _: None)
    assert record["parameters"]["ratio_achieved"] > 0.2
    model, _ = load_model(str(tmp_path / "out"), dtype="float32", device="cpu")
    if record["architecture"]["stock_loadable"]:
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock transformers
