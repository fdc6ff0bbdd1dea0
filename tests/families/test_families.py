"""Every family's adapter, on tiny random models: it finds the seven projections, a masked model computes
what the cut one does (heads, channels, hidden channels, whole layers), LoRA merges to the same model,
and the cut model saves and loads back in stock transformers with the same logits."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import FAMILIES, tiny_model, tokens

from prunetune.errors import UserError
from prunetune.families import FAMILIES as ADAPTERS
from prunetune.families import check_supported, family_of
from prunetune.structure.masks import Masks, apply_masks
from prunetune.structure.surgery import cut, merge_lora
from prunetune.structure.units import Structure, count_parameters, linear_shape, projection

TOL = 1e-4


def _masks(kind: str, structure: Structure, uniform: bool, seed: int = 0) -> Masks:
    """Random keep-masks of one kind; `uniform`: the same in every layer (Phi-3 needs that)."""
    g = torch.Generator().manual_seed(seed)
    masks = Masks()
    n = structure.num_layers
    first = structure.layers[0]
    for i in range(n):
        shape = structure.layers[i]
        step = 0 if uniform else i
        if kind in ("kv-group", "mixture"):
            kv = torch.zeros(shape.num_kv_heads, dtype=torch.bool)
            kv[: 1 + step % (shape.num_kv_heads - 1)] = True
            masks.heads[i] = Masks.heads_from_kv(kv[torch.randperm(len(kv), generator=g)] if not uniform else kv,
                                                 shape.group_size)
        if kind == "q-head":
            per_group = 1 + step % (shape.group_size - 1)
            masks.heads[i] = torch.cat([torch.arange(shape.group_size) < per_group] * shape.num_kv_heads)
        if kind in ("channels", "mixture"):
            keep = torch.zeros(first.intermediate, dtype=torch.bool)
            keep[torch.randperm(first.intermediate, generator=g)[: first.intermediate // 2
                                                                 + (0 if uniform else i)]] = True
            masks.channels[i] = keep
    if kind in ("hidden", "mixture-hidden"):
        masks.hidden = torch.rand(structure.hidden, generator=g) > 0.3
    if kind in ("layers", "mixture"):
        masks.layers = torch.tensor([i % 3 != 1 for i in range(n)])
    return masks


def _uniform_only(arch):
    return family_of(tiny_model(arch).config).uniform_only is not None


def test_every_family_is_listed_once():
    types = [t for family in ADAPTERS for t in family.model_types]
    assert len(types) == len(set(types))
    for arch in FAMILIES:
        assert check_supported(tiny_model(arch).config).model_types


def test_an_unsupported_family_is_refused_in_one_line():
    from transformers import AutoConfig

    with pytest.raises(UserError) as error:
        check_supported(AutoConfig.for_model("gpt2"))
    assert "\n" not in str(error.value) and "gpt2" in str(error.value)


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_adapter_finds_every_projection(arch):
    model = tiny_model(arch)
    s = Structure.of(model)
    assert s.num_layers == 4 and s.hidden == 96 and s.head_dim == 16
    assert all((shape.num_heads, shape.num_kv_heads, shape.intermediate) == (6, 3, 48) for shape in s.layers)
    layer = model.model.layers[0]
    assert (linear_shape(projection(layer, "o_proj")) == (96, 96)
            and linear_shape(projection(layer, "down_proj")) == (96, 48))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model)["total"]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("kind", ["kv-group", "q-head", "channels", "hidden", "layers", "mixture"])
def test_masked_model_equals_cut_model(arch, kind):
    model = tiny_model(arch)
    family = family_of(model)
    x = tokens()
    masks = _masks(kind, Structure.of(model), uniform=family.uniform_only is not None)
    if kind == "hidden" and family.no_hidden_cut:
        with pytest.raises(ValueError, match="hidden channels cannot"):
            apply_masks(model, masks)
        with pytest.raises(ValueError, match="hidden channels cannot"):
            cut(model, masks)
        return
    reference = model(x).logits
    with apply_masks(model, masks):
        masked = model(x).logits
    cut(model, masks)
    pruned = model(x).logits
    assert (masked - pruned).abs().max() <= TOL
    assert not torch.allclose(masked, reference)
    s = Structure.of(model)
    assert model.config.hidden_size == s.hidden and model.config.num_hidden_layers == s.num_layers
    for name in family.layer_lists:  # per-layer config lists follow the layers
        values = getattr(model.config, name, None)
        if values is not None:
            assert len(values) == s.num_layers


def _lora(model, seed=0):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT starts B at zero; a trained adapter does not
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_masked_cut_and_merged_agree(arch):
    model = _lora(tiny_model(arch))
    x = tokens()
    masks = _masks("mixture", Structure.of(model), uniform=_uniform_only(arch), seed=3)
    with apply_masks(model, masks):
        masked = model(x).logits
    cut(model, masks)
    unmerged = model(x).logits
    merged_model = merge_lora(model)
    merged = merged_model(x).logits
    assert (masked - unmerged).abs().max() <= TOL
    assert (unmerged - merged).abs().max() <= TOL
    assert not any("lora" in n for n, _ in merged_model.named_parameters())


@pytest.mark.parametrize("arch", FAMILIES)
def test_cut_model_saves_and_loads_in_stock_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunetune.export.hf import save_model
    from tiny import NoTokenizer

    model = tiny_model(arch)
    masks = _masks("mixture", Structure.of(model), uniform=True, seed=4)
    cut(model, masks)
    x = tokens()
    before = model(x).logits
    save_model(model, NoTokenizer(), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock transformers, no prunetune code
    assert (loaded(x).logits - before).abs().max() <= TOL
    assert (model(x).logits - before).abs().max() <= TOL  # the model in memory still works after writing


@pytest.mark.parametrize("model_type", ["gemma4_text", "qwen3_5_text", "llama4_text"])
def test_newer_families_that_do_not_fit_say_what_is_missing(model_type):
    from transformers import AutoConfig

    from prunetune.families import NOT_YET

    with pytest.raises(UserError) as error:
        check_supported(AutoConfig.for_model(model_type))
    assert str(error.value).endswith(NOT_YET[model_type]) and "\n" not in str(error.value)


@pytest.mark.parametrize("arch", [a for a in FAMILIES if a != "phi3"])
def test_layers_of_different_shapes_save_and_load_through_prunetune(arch, tmp_path):
    from prunetune.export.hf import VLLM_ARCHITECTURE, save_model
    from prunetune.models import load_model
    from tiny import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    model = tiny_model(arch, vocab_size=len(tokenizer))
    cut(model, _masks("mixture", Structure.of(model), uniform=False, seed=6))
    x = tokens()
    before = model(x).logits
    save_model(model, tokenizer, tmp_path)
    assert VLLM_ARCHITECTURE not in (tmp_path / "config.json").read_text()  # the plugin builds Llama's layer only
    loaded, _ = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert Structure.of(loaded) == Structure.of(model)
    assert (loaded(x).logits - before).abs().max() <= TOL


def test_phi3_refuses_layers_of_different_shapes_before_loading(tmp_path):
    from helpers import assert_user_error, run_cli
    from tiny import save_tiny_model_dir

    source = save_tiny_model_dir(tmp_path / "phi3", "phi3")
    done = run_cli("prune", str(source), "--layers", "paper", "--out", str(tmp_path / "out"), "--steps", "1",
                   cwd=tmp_path)
    assert_user_error(done, "Phi-3 needs every layer pruned alike", "--layers")
    assert not (tmp_path / "out").exists()


def test_gguf_export_of_another_family_names_the_form_that_works(tmp_path):
    from prunetune.export.gguf import check_gguf_export

    config = tiny_model("gemma2").config
    with pytest.raises(UserError, match="convert_hf_to_gguf.py") as error:
        check_gguf_export(config, tmp_path / "m.gguf", "f32", False)
    assert "\n" not in str(error.value)


def test_a_run_names_what_loads_its_model_and_the_form_that_serves_other_families():
    from prunetune.runs.card import loaders

    assert "vLLM" in loaders({"architecture": {"stock_loadable": True, "saved_as": "gemma2"}})
    assert "vLLM with prunetune" in loaders({"architecture": {"stock_loadable": False, "saved_as": "qwen2"}})
    line = loaders({"architecture": {"stock_loadable": False, "saved_as": "gemma2"}})
    assert "prunetune.load_model only" in line and "--layers all" in line
