"""`prunetune export` and the `--export gguf` option: what they write, and one line for every mistake,
with no model loaded and nothing left behind."""

import json

import pytest
from helpers import assert_no_output, assert_user_error, run_cli


@pytest.mark.parametrize("args, fragments", [
    (["--format", "gguf", "--outtype", "q4_k"], ["unknown --outtype 'q4_k' for gguf", "f32, f16, q8_0"]),
    (["--format", "hf", "--outtype", "q8_0"], ["unknown --outtype 'q8_0' for hf", "bf16"]),
    (["--format", "onnx"], ["unknown --format 'onnx'", "gguf or hf"]),
])
def test_export_refuses_bad_flags_before_loading(model_dir, tmp_path, no_model_load, args, fragments):
    out = tmp_path / ("m.gguf" if "gguf" in args else "m")
    assert_user_error(run_cli("export", model_dir, "--out", out, *args, cwd=tmp_path), *fragments)
    assert_no_output(out)


def test_export_refuses_a_directory_that_is_not_a_model(tmp_path, no_model_load):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    for fmt, out in (("gguf", tmp_path / "x.gguf"), ("hf", tmp_path / "x")):
        assert_user_error(run_cli("export", tmp_path / "notes", "--format", fmt, "--out", out, cwd=tmp_path),
                          "not a Hugging Face model directory")
        assert_no_output(out)


def test_export_refuses_an_existing_output_without_overwrite(model_dir, tmp_path, no_model_load):
    (tmp_path / "m.gguf").write_bytes(b"keep")
    (tmp_path / "m").mkdir()
    assert_user_error(run_cli("export", model_dir, "--out", tmp_path / "m.gguf", cwd=tmp_path), "--overwrite")
    assert_user_error(run_cli("export", model_dir, "--format", "hf", "--out", tmp_path / "m", cwd=tmp_path),
                      "--overwrite")
    assert (tmp_path / "m.gguf").read_bytes() == b"keep" and not any((tmp_path / "m").iterdir())


@pytest.mark.parametrize("command", [
    ["prune", "{model}", "--method", "magnitude", "--export", "ggml"],
    ["prune", "{model}", "--method", "magnitude", "--export", "gguf:q2"],
    ["shear", "{model}", "--target", "layers=1", "--export", "gguf:int4"],
    ["train", "{model}", "--export", "safetensors"],
])
def test_run_commands_check_export_before_loading(model_dir, tmp_path, no_model_load, command):
    out = tmp_path / "out"
    args = [a.replace("{model}", str(model_dir)) for a in command]
    assert_user_error(run_cli(*args, "--out", out, cwd=tmp_path), "--export")
    assert_no_output(out)


def test_per_layer_qwen3_with_export_is_refused_before_the_run(tiny_model_dir, tmp_path, no_model_load):
    qwen3 = tiny_model_dir("qwen3")
    out = tmp_path / "out"
    line = assert_user_error(run_cli("prune", qwen3, "--method", "loraprune", "--export", "gguf", "--out", out,
                                     cwd=tmp_path), "Qwen3", "--layers all")
    assert "deci" in line
    assert_no_output(out)


def test_loram_recover_export_needs_merge(tmp_path, no_model_load):
    out = tmp_path / "out"
    assert_user_error(run_cli("loram", "recover", tmp_path / "adapter", "--pruned", tmp_path / "p", "--full",
                              tmp_path / "f", "--export", "gguf", "--out", out, cwd=tmp_path), "--merge")
    assert_no_output(out)


def test_prune_with_export_writes_the_gguf_into_the_run_and_records_it(model_dir, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "pruned"
    done = run_cli("prune", model_dir, "--method", "magnitude", "--ratio", "0.25", "--no-eval", "--export", "gguf:f16",
                   "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    reader = GGUFReader(out / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    record = json.loads((out / "prunetune.json").read_text())
    assert record["exports"] == [{"format": "gguf", "file": "model.gguf", "architecture": "llama", "outtype": "f16",
                                  "tensors": len(reader.tensors), "bytes": (out / "model.gguf").stat().st_size,
                                  "tokenizer_pre": record["exports"][0]["tokenizer_pre"]}]


def test_export_hf_writes_a_stock_directory(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    done = run_cli("export", model_dir, "--format", "hf", "--outtype", "bf16", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert str(model.dtype) == "torch.bfloat16"
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if k.startswith("_")]
    assert json.loads((out / "prunetune.json").read_text())["command"] == "export"
    assert not (out / "run").exists()  # nothing to plot, no empty folder
