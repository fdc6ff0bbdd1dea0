"""`load_adapter` (the `--lora ADAPTER` of eval and bench): a PEFT adapter goes on the model it was
trained for, and one that does not fit stops with a one-line error instead of being half loaded."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model, tokens

from prunetune.errors import UserError
from prunetune.evaluate.adapter import load_adapter


def _save_adapter(model, directory) -> None:
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(directory)
    peft_model.unload()


def test_an_adapter_loads_on_its_own_model(tmp_path):
    model = tiny_model("qwen2")
    _save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        base = model(tokens()).logits
        adapted = load_adapter(model, tmp_path / "adapter")
        assert not torch.allclose(adapted(tokens()).logits, base)  # a random B is not a no-op
    assert sum("lora_B" in name for name, _ in adapted.named_parameters()) == 3 * 4


def test_an_adapter_with_weights_the_model_has_no_place_for_is_refused(tmp_path):
    """PEFT loads non-strictly: layer 3's weights would be dropped without a word on a 3-layer model."""
    _save_adapter(tiny_model("llama"), tmp_path / "adapter")
    with pytest.raises(UserError, match="6 weights this model has no place for") as error:
        load_adapter(tiny_model("llama", num_hidden_layers=3), tmp_path / "adapter")
    assert "layers.3." in str(error.value) and "\n" not in str(error.value)


def test_an_adapter_of_other_shapes_is_refused(tmp_path):
    _save_adapter(tiny_model("llama"), tmp_path / "adapter")
    with pytest.raises(UserError, match="does not fit this model") as error:
        load_adapter(tiny_model("llama", intermediate_size=32), tmp_path / "adapter")
    assert "\n" not in str(error.value)
