"""Masks act like surgery: for every architecture and unit kind, masked logits equal pruned logits."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import ARCHITECTURES, tiny_model, tokens

from prunetune.structure.masks import Masks, apply_masks
from prunetune.structure.surgery import cut, merge_lora
from prunetune.structure.units import Structure, count_parameters

TOL = 1e-4


def _random_masks(kind: str, structure: Structure, seed: int = 0) -> Masks:
    g = torch.Generator().manual_seed(seed)
    masks = Masks()
    n = structure.num_layers
    if kind in ("kv-group", "mixture"):
        for i in range(n):
            shape = structure.layers[i]
            kv = torch.zeros(shape.num_kv_heads, dtype=torch.bool)
            kv[torch.randperm(shape.num_kv_heads, generator=g)[: 1 + i % (shape.num_kv_heads - 1)]] = True
            masks.heads[i] = Masks.heads_from_kv(kv, shape.group_size)
    if kind == "q-head":
        for i in range(n):
            shape = structure.layers[i]
            per_group = 1 + i % (shape.group_size - 1) if shape.group_size > 1 else 1
            masks.heads[i] = torch.cat([
                torch.zeros(shape.group_size, dtype=torch.bool).index_fill_(
                    0, torch.randperm(shape.group_size, generator=g)[:per_group], True)
                for _ in range(shape.num_kv_heads)
            ])
    if kind in ("channels", "mixture"):
        for i in range(n):
            masks.channels[i] = torch.rand(structure.layers[i].intermediate, generator=g) > 0.4
    if kind in ("hidden", "mixture"):
        masks.hidden = torch.rand(structure.hidden, generator=g) > 0.3
    if kind in ("layers", "mixture"):
        masks.layers = torch.tensor([i % 3 != 1 for i in range(n)])
    return masks


UNIT_KINDS = ("kv-group", "q-head", "channels", "hidden", "layers", "mixture")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_masked_model_equals_pruned_model(arch, kind):
    model = tiny_model(arch)
    x = tokens()
    masks = _random_masks(kind, Structure.of(model))
    with apply_masks(model, masks):
        masked = model(x).logits
    unmasked_again = model(x).logits  # hooks are gone after the with-block
    cut(model, masks)
    pruned = model(x).logits
    assert (masked - pruned).abs().max() <= TOL
    assert not torch.allclose(masked, unmasked_again)  # the masks really changed something
    # The config describes the cut modules.
    s = Structure.of(model)
    assert model.config.hidden_size == s.hidden and model.config.num_hidden_layers == s.num_layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_keep_mask_is_identity(arch):
    model = tiny_model(arch)
    x = tokens()
    reference = model(x).logits
    s = Structure.of(model)
    masks = Masks(
        heads={i: torch.ones(l.num_heads, dtype=torch.bool) for i, l in enumerate(s.layers)},
        channels={i: torch.ones(l.intermediate, dtype=torch.bool) for i, l in enumerate(s.layers)},
        hidden=torch.ones(s.hidden, dtype=torch.bool),
        layers=torch.ones(s.num_layers, dtype=torch.bool),
    )
    with apply_masks(model, masks):
        assert (model(x).logits - reference).abs().max() <= TOL
    params = count_parameters(model)
    cut(model, masks)
    assert count_parameters(model) == params
    assert torch.equal(model(x).logits, reference)


def _lora(model, seed=0):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT starts B at zero; a trained adapter does not
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_masked_cut_and_merged_agree(arch):
    """Output masking covers base + LoRA; the cut slices LoRA A/B consistently; merging changes nothing."""
    model = _lora(tiny_model(arch))
    x = tokens()
    masks = _random_masks("mixture", Structure.of(model), seed=3)
    with apply_masks(model, masks):
        masked = model(x).logits
    cut(model, masks)
    unmerged = model(x).logits
    merged_model = merge_lora(model)
    merged = merged_model(x).logits
    assert (masked - unmerged).abs().max() <= TOL
    assert (unmerged - merged).abs().max() <= TOL
    assert not any("lora" in n for n, _ in merged_model.named_parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merged_lora_equals_unmerged(arch):
    model = _lora(tiny_model(arch), seed=1)
    x = tokens()
    unmerged = model(x).logits
    merged = merge_lora(model)(x).logits
    assert (unmerged - merged).abs().max() <= TOL


def test_masks_reject_unequal_query_heads_per_group():
    model = tiny_model("llama")
    s = Structure.of(model)
    masks = Masks(heads={0: torch.tensor([True, True, True, False, False, True])})
    with pytest.raises(ValueError, match="same number"):
        masks.validate(s)
    with pytest.raises(ValueError, match="every head"):
        Masks(heads={0: torch.zeros(6, dtype=torch.bool)}).validate(s)


def test_kept_summary_round_trips():
    s = Structure.of(tiny_model("qwen3"))
    masks = _random_masks("mixture", s, seed=5)
    back = Masks.from_summary(masks.kept_summary(s), s)
    assert back.kept_summary(s) == masks.kept_summary(s)


def test_generation_with_cache_after_layer_removal():
    """Removed layers renumber the KV cache; incremental decoding must match a full forward."""
    model = tiny_model("qwen2")
    masks = _random_masks("mixture", Structure.of(model), seed=2)
    cut(model, masks)
    x = tokens(batch=1, length=6)
    generated = model.generate(x, max_new_tokens=5, do_sample=False)
    full = model(generated).logits[0, x.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(full, generated[0, x.shape[1]:])
