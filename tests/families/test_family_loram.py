"""LoRAM on every family: an adapter trained on the pruned model, recovered to the full model's shapes
and loaded there with stock PEFT, computes with the pruned units masked what the pruned model computes."""

import copy

import pytest
import torch
from peft import PeftModel
from tiny import FAMILIES, tiny_model, tokens
from transformers import AutoModelForCausalLM

from prunetune.families import family_of
from prunetune.families.adapters import load_peft
from prunetune.methods.loram.recover import recover_adapter
from prunetune.structure.masks import Masks, apply_masks
from prunetune.structure.surgery import cut
from prunetune.structure.units import Structure
from prunetune.training.lora import LoraSettings, add_lora


def _masks(structure: Structure, uniform: bool) -> Masks:
    """One kv group and half the channels out of every layer; unless uniform, layer 1 keeps its heads
    and layer 3 is left whole."""
    masks = Masks()
    for i, shape in enumerate(structure.layers):
        if not uniform and i == 3:
            continue
        if uniform or i != 1:
            masks.heads[i] = Masks.heads_from_kv(torch.tensor([True, False, True]), shape.group_size)
        masks.channels[i] = torch.arange(shape.intermediate) % 2 == 0
    return masks


@pytest.mark.parametrize("arch", FAMILIES)
def test_recovered_adapter_on_the_full_model_equals_the_pruned_model_with_its_adapter(arch, tmp_path):
    full = tiny_model(arch)
    structure = Structure.of(full)
    masks = _masks(structure, uniform=family_of(full).uniform_only is not None)
    pruned = add_lora(cut(copy.deepcopy(full), masks), LoraSettings(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    pruned.eval().save_pretrained(tmp_path / "adapter")
    recover_adapter(tmp_path / "adapter", masks.kept_summary(structure), full, tmp_path / "recovered", "full")
    served = load_peft(copy.deepcopy(full), tmp_path / "recovered").eval()
    x = tokens()
    with torch.no_grad():
        with apply_masks(served, masks):
            masked = served(x).logits
        expected = pruned(x).logits
    assert (masked - expected).abs().max() <= 1e-4
    if family_of(full).fused:  # the recovered adapter is stock PEFT's, on the stock (fused) model
        stock = copy.deepcopy(full)
        family_of(stock).join_fused(stock)
        stock.save_pretrained(tmp_path / "stock")
        on_stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "stock"),
                                             str(tmp_path / "recovered")).eval()
        with torch.no_grad():
            assert (on_stock(x).logits - served(x).logits).abs().max() <= 1e-5
