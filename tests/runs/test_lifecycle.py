"""The run lifecycle's shared outputs: the model card every output directory gets, written from the run's
record, and the settings every run shares."""

import json

import pytest
from huggingface_hub import ModelCard

from prunetune.errors import UserError
from prunetune.runs.card import write_card
from prunetune.runs.settings import EvalSettings, checkpoint_dir_for

PRUNE_RECORD = {
    "prunetune_version": "0.1.0", "command": "prune", "argv": ["prune", "smollm2-135m", "--ratio", "0.2", "--out", "x"],
    "created": "2026-12-06T10:00:00+0000", "device": "cpu", "source_model": "smollm2-135m", "method": "loraprune",
    "settings": {"method": "loraprune", "ratio": 0.2},
    "parameters": {"before": {"total": 134515008}, "after": {"total": 117300000}, "ratio_target": 0.2,
                   "ratio_achieved": 0.188},
    "results": {"perplexity_before": {"perplexity": 12.57, "data": "builtin:pydoc", "seq_len": 256, "windows": 40},
                "perplexity_after": {"perplexity": 11.81, "data": "builtin:pydoc", "seq_len": 256, "windows": 40}},
    "architecture": {"stock_loadable": True}, "elapsed_seconds": 600.0,
}


def test_a_pruned_model_card_has_the_hub_metadata_and_the_runs_facts(tmp_path):
    write_card(tmp_path, PRUNE_RECORD)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "prunetune"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the alias's model on the Hub
    assert card.data.license == "apache-2.0"  # read from the shipped GGUF's general.license
    assert {"pruned", "loraprune", "prunetune"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"
    text = card.text
    assert "134,515,008 → 117,300,000" in text and "12.57 → 11.81" in text
    assert "256-token windows" in text and "40 windows" in text  # the protocol beside the numbers
    assert "prunetune prune smollm2-135m --ratio 0.2 --out x" in text  # the exact command
    assert "AutoModelForCausalLM.from_pretrained" in text and "vllm serve" in text


def test_a_model_whose_layers_differ_is_loaded_through_prunetune_in_its_card(tmp_path):
    write_card(tmp_path, PRUNE_RECORD | {"architecture": {"stock_loadable": False}, "source_model": str(tmp_path)})
    card = ModelCard.load(tmp_path / "README.md")
    assert "prunetune.load_model" in card.text and "AutoModelForCausalLM" not in card.text
    assert card.data.base_model is None  # a local model has no Hub id to link to


def test_an_adapter_keeps_pefts_card_and_gains_the_runs_facts(tmp_path):
    peft_card = "---\nbase_model: some/model\nlibrary_name: peft\ntags:\n- lora\n---\n\n# Model Card\n"
    (tmp_path / "README.md").write_text(peft_card)
    record = {"command": "loram recover", "argv": [], "full_model": "smollm2-135m", "adapter": "a", "pruned": "p",
              "loram": {"method": "stru"}, "merged": False}
    write_card(tmp_path, record, adapter=True)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"lora", "loram", "prunetune"} <= set(card.data.tags) and "pruned" not in card.data.tags
    assert "PeftModel.from_pretrained" in card.text and "--enable-lora" in card.text


def test_a_run_directorys_card_names_the_model_it_started_from(tmp_path):
    source = tmp_path / "pruned"
    source.mkdir()
    (source / "prunetune.json").write_text(json.dumps(PRUNE_RECORD))
    write_card(tmp_path, {"command": "train", "model": str(source), "method": "continued pre-training",
                          "parameters": {"total": 100}})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "sheared-llama" in card.data.tags


def test_eval_settings_check_the_window_count():
    EvalSettings(max_windows=1).check()
    with pytest.raises(UserError):
        EvalSettings(max_windows=0).check()


def test_the_checkpoint_is_a_hidden_sibling(tmp_path):
    assert checkpoint_dir_for(tmp_path / "out") == tmp_path / ".out.checkpoint"
