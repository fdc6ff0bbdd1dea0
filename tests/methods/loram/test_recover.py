"""LoRAM recovery: an adapter trained on a pruned model, moved to the full model's shapes.

The invariant: the full model with the recovered adapter and the pruned units masked computes what
the pruned model with its trained adapter computes, and B_R·A_R is the trained update on kept rows
and columns and exactly zero elsewhere.
"""

import copy
import json
import warnings
from dataclasses import asdict

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tiny import ARCHITECTURES, tiny_model, tokens

from prunetune.errors import UserError
from prunetune.training.lora import LoraSettings, add_lora, lora_matrices
from prunetune.structure.masks import Masks, apply_masks
from prunetune.methods.loram.recover import (
    FullShapes,
    merge_into,
    read_pruned_run,
    recover_adapter,
    recover_identity,
    recover_tensors,
)
from prunetune.structure.surgery import cut, merge_lora
from prunetune.structure.units import PROJECTIONS, Structure, projection

TOL = 1e-4
FULL_SPEC = "my-org/full-model"


def _masks(structure: Structure) -> Masks:
    """Layer 0: one kv group and some channels out; layer 1: one query head per group; layer 2:
    channels only; layer 3: untouched."""
    g = torch.Generator().manual_seed(0)
    s0, s1 = structure.layers[0], structure.layers[1]
    return Masks(
        heads={0: Masks.heads_from_kv(torch.tensor([True, False, True]), s0.group_size),
               1: torch.tensor([False, True] * s1.num_kv_heads)},
        channels={0: torch.rand(s0.intermediate, generator=g) > 0.4,
                  2: torch.rand(structure.layers[2].intermediate, generator=g) > 0.5},
    )


def _randomize(peft_model, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


class Case:
    """A full model, its pruned copy with a trained-looking adapter, and the recovered adapter."""

    def __init__(self, arch, root):
        self.full = tiny_model(arch)
        self.structure = Structure.of(self.full)
        self.masks = _masks(self.structure)
        self.kept = self.masks.kept_summary(self.structure)
        self.pruned = add_lora(cut(copy.deepcopy(self.full), self.masks), LoraSettings(r=4, alpha=8, dropout=0.0))
        _randomize(self.pruned)
        self.pruned.eval()
        self.adapter_dir, self.recovered_dir = root / "pruned_adapter", root / "recovered"
        self.pruned.save_pretrained(self.adapter_dir)
        recover_adapter(self.adapter_dir, self.kept, self.full, self.recovered_dir, FULL_SPEC)

    def keep(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean kept rows and columns of a projection's weight in the full model."""
        hd, shape, hidden = self.structure.head_dim, self.structure.layers[layer], self.structure.hidden
        heads = self.masks.heads.get(layer, torch.ones(shape.num_heads, dtype=torch.bool)).repeat_interleave(hd)
        kv = self.masks.kv_heads(layer, self.structure)
        kv = (torch.ones(shape.num_kv_heads, dtype=torch.bool) if kv is None else kv).repeat_interleave(hd)
        channels = self.masks.channels.get(layer, torch.ones(shape.intermediate, dtype=torch.bool))
        all_hidden = torch.ones(hidden, dtype=torch.bool)
        return {"q_proj": (heads, all_hidden), "k_proj": (kv, all_hidden), "v_proj": (kv, all_hidden),
                "o_proj": (all_hidden, heads), "gate_proj": (channels, all_hidden),
                "up_proj": (channels, all_hidden), "down_proj": (all_hidden, channels)}[name]

    def load_recovered(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(copy.deepcopy(self.full), str(self.recovered_dir))
        assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
        return model.eval()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def _key(layer, name, matrix):
    parent = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
    return f"base_model.model.model.layers.{layer}.{parent}.{name}.{matrix}.weight"


def test_recovered_update_is_trained_update_on_kept_block_and_zero_elsewhere(case):
    recovered = load_file(case.recovered_dir / "adapter_model.safetensors")
    trained = load_file(case.adapter_dir / "adapter_model.safetensors")
    assert recovered.keys() == trained.keys()
    for layer in range(case.structure.num_layers):
        for name in PROJECTIONS:
            delta_r = recovered[_key(layer, name, "lora_B")] @ recovered[_key(layer, name, "lora_A")]
            delta = trained[_key(layer, name, "lora_B")] @ trained[_key(layer, name, "lora_A")]
            rows, cols = case.keep(layer, name)
            assert delta_r.shape == (len(rows), len(cols))
            assert torch.allclose(delta_r[rows][:, cols], delta, atol=1e-6), (layer, name)
            assert not delta_r[~rows].any() and not delta_r[:, ~cols].any(), (layer, name)
            if layer == 3:  # not pruned: copied exactly
                assert torch.equal(recovered[_key(layer, name, "lora_A")], trained[_key(layer, name, "lora_A")])
                assert torch.equal(recovered[_key(layer, name, "lora_B")], trained[_key(layer, name, "lora_B")])
    config = json.loads((case.recovered_dir / "adapter_config.json").read_text())
    source = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == FULL_SPEC
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in source.items() if k != "base_model_name_or_path"}


def test_masked_full_model_with_recovered_adapter_equals_pruned_model_with_adapter(case):
    model = case.load_recovered()
    saved = load_file(case.recovered_dir / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert loaded.keys() == saved.keys()  # nothing missing, nothing unexpected (PEFT only warns on missing)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    x = tokens()
    with torch.no_grad():
        pruned = case.pruned(x).logits
        with apply_masks(model, case.masks):
            masked = model(x).logits
        with case.pruned.disable_adapter():
            pruned_base = case.pruned(x).logits
    assert (masked - pruned).abs().max() <= TOL
    assert (pruned - pruned_base).abs().max() > 100 * TOL  # the adapter really changes the output


def test_recover_then_merge_is_W_plus_scaled_update_and_agrees_with_merging_the_pruned_model(case):
    peft_model = case.load_recovered()
    x = tokens()
    with torch.no_grad():
        unmerged = peft_model(x).logits
    expected = {}
    for i, layer in enumerate(peft_model.get_base_model().model.layers):
        for lora in lora_matrices(layer):
            base = lora.module.base_layer.weight.detach()
            expected[i, lora.name] = base + lora.scaling * lora.B.detach() @ lora.A.detach()
    merged = merge_into(copy.deepcopy(case.full), case.recovered_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    pruned_merged = merge_lora(copy.deepcopy(case.pruned))
    for i, (layer, pruned_layer) in enumerate(zip(merged.model.layers, pruned_merged.model.layers)):
        for name in PROJECTIONS:
            weight = projection(layer, name).weight
            assert torch.allclose(weight, expected[i, name], atol=1e-6), (i, name)
            rows, cols = case.keep(i, name)  # the kept block is what merging on the pruned model gives
            assert torch.allclose(weight[rows][:, cols], projection(pruned_layer, name).weight, atol=1e-6), (i, name)
    with torch.no_grad():
        assert (merged(x).logits - unmerged).abs().max() <= TOL


def test_kept_summary_and_shapes_from_run_directory(case, tmp_path):
    """read_pruned_run reads prunetune.json; with no config.json the head size comes off the adapter."""
    run = tmp_path / "run"
    run.mkdir()
    record = {"source_model": "src", "kept": case.kept,
              "architecture": {"source_layer_shapes": [asdict(s) for s in case.structure.layers],
                               "source_hidden": case.structure.hidden}}
    (run / "prunetune.json").write_text(json.dumps(record))
    pruned_run = read_pruned_run(run)
    assert pruned_run.kept == case.kept and pruned_run.source_model == "src" and pruned_run.full.head_dim is None
    assert pruned_run.full.layers == case.structure.layers
    recover_adapter(case.adapter_dir, pruned_run.kept, pruned_run.full, tmp_path / "out", FULL_SPEC)
    ours, reference = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "out", case.recovered_dir))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    (run / "config.json").write_text(json.dumps({"head_dim": case.structure.head_dim}))
    assert read_pruned_run(run).full.head_dim == case.structure.head_dim
    assert FullShapes.of(case.full.config) == FullShapes.of(case.full) == FullShapes.of(case.structure)


def test_unstructured_recovery_is_the_identity(tmp_path):
    """Same shapes (unstructured / 2:4): the adapter is re-targeted, its tensors untouched."""
    full = tiny_model("llama")
    sparse = copy.deepcopy(full)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in sparse.model.layers:
            for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
                linear.weight.mul_(torch.rand(linear.weight.shape, generator=g) > 0.5)
    adapter = add_lora(sparse, LoraSettings(r=4, alpha=8, dropout=0.0))
    _randomize(adapter, seed=1)
    adapter.save_pretrained(tmp_path / "adapter")
    recover_identity(tmp_path / "adapter", tmp_path / "out", FULL_SPEC)
    before, after = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("adapter", "out"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == FULL_SPEC
    loaded = PeftModel.from_pretrained(full, str(tmp_path / "out"))
    loaded = get_peft_model_state_dict(loaded, save_embedding_layers=False)
    assert all(torch.equal(loaded[k], before[k]) for k in before)


def _one_line_error(match, call):
    with pytest.raises(UserError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_errors_are_one_line_and_leave_nothing(case, tmp_path):
    out = tmp_path / "out"
    recover = lambda kept, full=case.full: recover_adapter(case.adapter_dir, kept, full, out, FULL_SPEC)  # noqa: E731

    removed = Masks(layers=torch.tensor([True, False, True, True])).kept_summary(case.structure)
    _one_line_error("layers were removed", lambda: recover(removed))
    hidden = Masks(hidden=torch.arange(case.structure.hidden) % 4 != 0).kept_summary(case.structure)
    _one_line_error("hidden channels were pruned", lambda: recover(hidden))

    other = copy.deepcopy(case.kept)  # a kept summary that keeps one more MLP channel in layer 0
    entry = other["layers"][0]
    entry["channels"] = sorted(set(range(case.structure.layers[0].intermediate)) - set(entry["channels"]))[:1] \
        + entry["channels"]
    entry["channels"].sort()
    _one_line_error("not trained on this pruned model", lambda: recover(other))
    full_kept = Masks().kept_summary(case.structure)  # as if nothing had been pruned
    _one_line_error("not trained on this pruned model", lambda: recover(full_kept))
    wider = FullShapes(case.structure.layers, hidden=128)  # another full model: A of q has 96 columns, not 128
    widened = copy.deepcopy(case.kept) | {"num_hidden": 128, "hidden": list(range(128))}
    tensors = load_file(case.adapter_dir / "adapter_model.safetensors")
    _one_line_error("another model", lambda: recover_tensors(tensors, widened, wider))
    fewer_layers = FullShapes(case.structure.layers[:3], case.structure.hidden)
    _one_line_error("another model", lambda: recover(case.kept, fewer_layers))
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())

    _one_line_error("no readable prunetune.json", lambda: read_pruned_run(tmp_path))
    (tmp_path / "prunetune.json").write_text(json.dumps({"command": "eval"}))
    _one_line_error("not a structured-pruning output", lambda: read_pruned_run(tmp_path))
    _one_line_error("not a PEFT adapter directory", lambda: recover_identity(tmp_path, out, FULL_SPEC))
