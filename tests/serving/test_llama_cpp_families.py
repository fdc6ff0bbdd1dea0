"""Families beyond Llama and Qwen in the real llama.cpp: a tiny random model of each, pruned by prunetune
to one shape in every layer and written as a Hugging Face directory, converted the way a llama.cpp
user converts any checkpoint (llama.cpp's own `convert_hf_to_gguf.py`, at the commit llama-cpp-python
bundles; `make serving-setup` unpacks it into .venv-serving/llama.cpp), then run by llama-cpp-python:
f32 logits within the tiny models' tolerance of transformers', and the same greedy tokens.

Gemma 2's and Phi-3's converters read a SentencePiece `tokenizer.model`, so they get one trained here on
pydoc's text (400 pieces with byte fallback, and the special tokens llama.cpp looks up in a model named
Phi-3); the others take SmolLM2's byte-level BPE tokenizer. What llama.cpp cannot hold is stated, not
skipped: for Phi-3, OLMo 2, OLMo 3 and Granite it builds attention with head count x head size equal to
the hidden size (the converter writes no separate head size), so a model with heads cut does not load
(`check_tensor_dims: ... wrong shape`); those are checked with every head kept (MLP channels cut)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

sys.path.insert(0, str(Path(__file__).parent))  # the llama.cpp checks' helpers, beside this file
from test_llama_cpp import TINY_TOL, _hf_greedy, _hf_logits, _llama, _llama_greedy, _llama_logits  # noqa: E402
from tiny import FAMILIES, NoTokenizer, smollm2_tokenizer, tiny_model, uniform_masks  # noqa: E402

from prunetune.export.hf import save_model  # noqa: E402
from prunetune.structure.surgery import cut  # noqa: E402
from prunetune.structure.units import Structure  # noqa: E402

CONVERTER = Path(os.environ.get("LLAMA_CPP_CONVERTER", Path(sys.prefix) / "llama.cpp"))
SENTENCEPIECE = ("gemma2", "phi3")
HEADS_KEPT = ("phi3", "olmo2", "olmo3", "granite")  # llama.cpp: heads x head size must equal the hidden size
PHI3_SPECIAL = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
# Gemma's GELU and soft-capping run in llama.cpp's own approximations: 1e-3 apart on these tiny models
TOLERANCE = {"gemma2": 5e-3, "gemma3_text": 5e-3}
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    import sentencepiece
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("spm")
    (root / "text.txt").write_text("\n".join(topics[key] for key in sorted(topics)[:80]))
    sentencepiece.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "tok"),
                                             vocab_size=400, model_type="bpe", byte_fallback=True,
                                             user_defined_symbols=PHI3_SPECIAL, minloglevel=2)
    return root / "tok.model"


@pytest.mark.parametrize("arch", FAMILIES)
def test_converted_by_llama_cpp_and_run_there(arch, sentencepiece_model, tmp_path):
    assert (CONVERTER / "convert_hf_to_gguf.py").exists(), f"no converter in {CONVERTER}; run make serving-setup"
    spm = arch in SENTENCEPIECE
    tokenizer = None if spm else smollm2_tokenizer()
    # a long sliding window: the prompt fits it, as in the families' real configs
    window = {"sliding_window": 128} if arch.startswith(("gemma", "olmo3")) else {}
    model = tiny_model(arch, vocab_size=400 if spm else len(tokenizer), **window)
    kv_kept = [True, True, True] if arch in HEADS_KEPT else [True, False, True]
    cut(model, uniform_masks(Structure.of(model), kv_kept, 20))
    out = tmp_path / arch
    save_model(model, NoTokenizer() if spm else tokenizer, out)
    if spm:
        shutil.copy(sentencepiece_model, out / "tokenizer.model")
    gguf = tmp_path / f"{arch}.gguf"
    subprocess.run([sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(out), "--outfile", str(gguf),
                    "--outtype", "f32"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")})
    ids = [5, 17, 33, 2, 8, 91, 40, 7, 12, 3]
    with contextlib.closing(_llama(gguf, f32_cache=True, n_ctx=model.config.max_position_embeddings)) as llm:
        diff = float(np.abs(_llama_logits(llm, ids) - _hf_logits(model, ids)).max())
        assert diff <= TOLERANCE.get(arch, TINY_TOL["f32"]), (arch, diff)
        assert _llama_greedy(llm, ids, NEW_TOKENS) == _hf_greedy(model, ids, NEW_TOKENS), arch
