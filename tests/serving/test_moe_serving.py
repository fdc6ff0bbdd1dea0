"""Mixtures of experts pruned by expert, in the real llama.cpp and vLLM (`make test-serving`).

A tiny random Mixtral, Qwen3-MoE and OLMoE with SmolLM2's tokenizer, cut by prunetune to four of six
experts in every layer (a different four per layer), 20 of 32 channels in every expert, and one of
three key/value groups (OLMoE keeps its heads: stock transformers sizes its q norm by the hidden size),
saved as a Hugging Face directory:

- llama.cpp: converted the way a llama.cpp user converts any checkpoint (its own
  `convert_hf_to_gguf.py`, unpacked by `make serving-setup`), run by llama-cpp-python: f32 logits
  within the tiny models' tolerance of transformers', and the same greedy tokens;
- vLLM: loaded by the stock engine with every plugin switched off; its greedy continuations equal
  transformers' token for token.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the engines' helpers, beside this file
from tiny import MOE_FAMILIES, moe_masks, smollm2_tokenizer, tiny_model  # noqa: E402

from prunetune.export.hf import save_model  # noqa: E402
from prunetune.families import family_of  # noqa: E402
from prunetune.structure.surgery import cut  # noqa: E402
from prunetune.structure.units import Structure  # noqa: E402

CONVERTER = Path(os.environ.get("LLAMA_CPP_CONVERTER", Path(sys.prefix) / "llama.cpp"))
NEW_TOKENS = 16
IDS = [5, 17, 33, 2, 8, 91, 40, 7, 12, 3]


def _pruned(arch: str):
    """The tiny mixture, cut as the module says (the masks differ per layer; the shapes do not)."""
    # vLLM's CPU attention needs head_dim % 32 == 0; OLMoE's q norm is as wide as the hidden size
    model = tiny_model(arch, vocab_size=len(smollm2_tokenizer()), head_dim=32, hidden_size=192)
    masks = moe_masks(Structure.of(model), heads=family_of(model).no_head_cut is None)
    return cut(model, masks).eval()


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    root = tmp_path_factory.mktemp("moe")
    made = {}
    for arch in MOE_FAMILIES:
        model = _pruned(arch)
        save_model(model, smollm2_tokenizer(), root / arch)
        made[arch] = (model, root / arch)
    return made


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_pruned_mixture_converted_by_llama_cpp_and_run_there(arch, pruned_dirs, tmp_path):
    pytest.importorskip("llama_cpp")
    from test_llama_cpp import TINY_TOL, _hf_greedy, _hf_logits, _llama, _llama_greedy, _llama_logits

    assert (CONVERTER / "convert_hf_to_gguf.py").exists(), f"no converter in {CONVERTER}; run make serving-setup"
    model, directory = pruned_dirs[arch]
    gguf = tmp_path / f"{arch}.gguf"
    subprocess.run([sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(directory), "--outfile", str(gguf),
                    "--outtype", "f32"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")})
    with contextlib.closing(_llama(gguf, f32_cache=True, n_ctx=model.config.max_position_embeddings)) as llm:
        diff = float(np.abs(_llama_logits(llm, IDS) - _hf_logits(model, IDS)).max())
        assert diff <= TINY_TOL["f32"] * 10, (arch, diff)
        assert _llama_greedy(llm, IDS, NEW_TOKENS) == _hf_greedy(model, IDS, NEW_TOKENS), arch


def test_pruned_mixtures_in_stock_vllm_match_transformers(pruned_dirs, tmp_path):
    pytest.importorskip("vllm")
    from test_vllm import ENGINE, NEW_TOKENS as VLLM_TOKENS, OFFLINE, SCRIPT, vllm_env
    import json

    (tmp_path / f"{OFFLINE}.py").write_text(SCRIPT)
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps({"models": [str(pruned_dirs[a][1]) for a in MOE_FAMILIES], "prompts": [IDS],
                               "new_tokens": VLLM_TOKENS, "ignore_eos": True, "engine": {**ENGINE, "max_model_len": 128}}))
    subprocess.run([sys.executable, str(tmp_path / f"{OFFLINE}.py"), str(job), str(out)], check=True, cwd=tmp_path,
                   env=vllm_env("", VLLM_ALLOW_INSECURE_SERIALIZATION="1"), timeout=1500)
    results = json.loads(out.read_text())
    for arch, result in zip(MOE_FAMILIES, results):
        model = pruned_dirs[arch][0]
        with torch.no_grad():
            expected = model.generate(torch.tensor([IDS]), max_new_tokens=VLLM_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(IDS):].tolist()
        assert result["tokens"][0] == expected, arch
