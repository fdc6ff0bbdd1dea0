"""GGUF exports run in the real llama.cpp (llama-cpp-python, in .venv-serving) and compute what
prunetune computes: the real SmolLM2 pruned uniformly, pruned per layer (llama.cpp's `deci`; MLP
widths only, and heads and key/value heads too) and unpruned (the round trip of the shipped GGUF),
each written at f32 and f16; and tiny random models of the architectures those do not reach
(Mistral, Llama-3 RoPE, Qwen2 as `qwen2` and as `deci`, Qwen3), at f32, f16 and q8_0.

Tolerances (measured on the 2-core development machine; max |logit difference| over PROMPTS, logits
of magnitude 30-41, residual activations up to ~25000):
- f32: uniform 1.7e-3 on one machine and 1.04e-2 on another (AVX-512 with AMX), per-layer 9.4e-5, per-layer
  with heads 2.1e-4, dense 1.2e-4. llama.cpp's CPU kernels sum in other orders and blocks, and the
  uniform model (magnitude-pruned, no recovery, activations near 19,000) amplifies rounding the most:
  transformers' own fp32 logits of it differ from its fp64 logits by 3.7e-3 (dense: 6.3e-5). So the
  bound is relative to that fp32 error, as f16's is to f16 rounding: F32_FACTOR times transformers'
  fp32-vs-fp64 distance plus F32_FLOOR (two fp32 sums in different orders each sit about that far
  from the exact value). It stays far below what a wrong permutation, bias or RoPE frequency does
  (whole units).
- f16: llama.cpp rounds the weights and, in its f16 matrix products, the activations to f16. The
  same rounding done in transformers (f16 weights, f16 inputs to every Linear) already moves the
  uniform model's logits by up to 1.15 (per-layer 0.11 and 0.15, dense 0.13): that model is
  unstable under f16, whoever computes it. So llama.cpp's f16 distance from fp32 is bounded relative
  to that emulation's (measured ratio up to 1.25), and the top token must agree at >= 95% of positions.
The KV cache is kept in f32 for the logit checks (llama.cpp's default is f16), so that they measure
the file, not the cache; the tokenizer check runs with the defaults.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from prunetune.export.gguf import export_gguf, write_gguf  # noqa: E402
from prunetune.models import load_model  # noqa: E402

F32_FACTOR, F32_FLOOR = 10.0, 1e-3  # f32: max diff <= F32_FACTOR * transformers' own fp32 error + F32_FLOOR
F16_FACTOR, F16_FLOOR = 2.0, 0.05  # f16: max diff <= F16_FACTOR * transformers' own f16 rounding's + F16_FLOOR
F16_TOP1 = 0.95  # share of positions whose top token agrees at f16
NEW_TOKENS = 24
N_CTX = 256


@pytest.fixture(scope="module", autouse=True)
def _no_amx_repacking():
    """On CPUs with AMX, llama.cpp repacks quantized weights into AMX buffers and its AMX matrix product
    segfaults (ggml-org/llama.cpp#20824, closed unfixed): here, with llama-cpp-python 0.3.36, on
    llama.cpp's own q8_0 quantization of SmolLM2, on the shipped Q4_1 GGUF, and on our q8_0 exports
    alike. On such CPUs the checks load models without the extra buffer types (what llama.cpp's
    `--no-repack` does), so they test the files, not that kernel. Elsewhere nothing changes."""
    if "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode():
        yield
        return
    default = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers)
        yield


def _llama(path, f32_cache: bool, n_ctx: int = N_CTX):
    kwargs = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=1, n_threads_batch=1,
                           verbose=False, **kwargs)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@torch.no_grad()
def _hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@torch.no_grad()
def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    # Greedy decoding with transformers' KV cache, one token at a time (no generation_config in the way).
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.fixture(scope="module", params=["uniform", "per_layer", "per_layer_heads", "dense"])
def case(request, tmp_path_factory):
    """(name, fp32 model, tokenizer, {outtype: gguf path}): f32 written by write_gguf from the spec (the
    path users take), f16 by export_gguf from the model in memory."""
    name = request.param
    spec = "smollm2-135m" if name == "dense" else str(request.getfixturevalue(f"{name}_dir"))
    model, tokenizer = load_model(spec, dtype="float32", device="cpu")
    directory = tmp_path_factory.mktemp(f"gguf-{name}")
    files = {"f32": directory / f"{name}-f32.gguf", "f16": directory / f"{name}-f16.gguf"}
    summary = write_gguf(spec, files["f32"], "f32")
    assert summary["architecture"] == ("deci" if name.startswith("per_layer") else "llama")
    assert summary["tokenizer_pre"] == "smollm"
    export_gguf(model, tokenizer, files["f16"], "f16")
    return name, model, tokenizer, files


def test_tokenizer_gives_the_same_ids(case, prompts):
    _, _, tokenizer, files = case
    with contextlib.closing(_llama(files["f16"], f32_cache=False)) as llm:
        for prompt in prompts:
            # add_bos=True: llama.cpp adds BOS only where the file says the tokenizer does (SmolLM2: no).
            assert llm.tokenize(prompt.encode(), add_bos=True) == tokenizer.encode(prompt), prompt


def test_f32_logits_match(case, prompts, record_property):
    name, model, tokenizer, files = case
    exact = copy.deepcopy(model).double()
    worst, worst_fp32 = 0.0, 0.0
    with contextlib.closing(_llama(files["f32"], f32_cache=True)) as llm:
        for ids in (tokenizer.encode(prompt) for prompt in prompts):
            ours, theirs = _hf_logits(model, ids), _llama_logits(llm, ids)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            worst_fp32 = max(worst_fp32, float(np.abs(ours - _hf_logits(exact, ids)).max()))
    print(f"\n{name} f32: max |logit diff| {worst:.2e} (transformers' fp32 against fp64: {worst_fp32:.2e})")
    record_property("max_abs_diff", worst)
    assert worst <= F32_FACTOR * worst_fp32 + F32_FLOOR


@torch.no_grad()
def _f16_emulation(model):
    """The model as llama.cpp computes an f16 file: weights rounded to f16, and so is the input of
    every matrix product (ggml converts it to the weight's type)."""
    emulated = copy.deepcopy(model)
    for param in emulated.parameters():
        if param.dim() == 2:
            param.copy_(param.half().float())
    for module in emulated.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (args[0].half().float(),))
    return emulated


def test_f16_logits_match(case, prompts, record_property):
    name, model, tokenizer, files = case
    emulated = _f16_emulation(model)
    worst, worst_emulated, agree, total = 0.0, 0.0, 0, 0
    with contextlib.closing(_llama(files["f16"], f32_cache=True)) as llm:
        for ids in (tokenizer.encode(prompt) for prompt in prompts):
            ours, theirs = _hf_logits(model, ids), _llama_logits(llm, ids)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            worst_emulated = max(worst_emulated, float(np.abs(ours - _hf_logits(emulated, ids)).max()))
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(ids)
    print(f"\n{name} f16: max |logit diff| {worst:.2e} (transformers' f16 rounding: {worst_emulated:.2e}), "
          f"top-1 agreement {agree}/{total}")
    record_property("max_abs_diff", worst)
    assert worst <= F16_FACTOR * worst_emulated + F16_FLOOR
    assert agree >= F16_TOP1 * total


def test_f32_greedy_continuation_matches(case, prompts):
    _, model, tokenizer, files = case
    with contextlib.closing(_llama(files["f32"], f32_cache=True)) as llm:
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            assert _llama_greedy(llm, ids, NEW_TOKENS) == _hf_greedy(model, ids, NEW_TOKENS), prompt


# ---------------------------------------------------------------------------------------------
# Tiny random models of every architecture (the SmolLM2 tokenizer, so that llama.cpp loads them)

# Max |logit difference| on tiny random models (logits ~1); measured: f32 ~5e-7, f16 ~8e-4, q8_0 ~2e-2.
TINY_TOL = {"f32": 1e-5, "f16": 5e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2-full-heads", "qwen2", "qwen3", "llama-per-layer",
                                  "qwen2-per-layer"])
def test_tiny_models_in_llama_cpp(name, smollm2_tokenizer, prompts, tmp_path):
    from tiny import EXPORT_MODELS as MODELS

    build, arch = MODELS[name]
    torch.manual_seed(0)
    model = build(len(smollm2_tokenizer))
    files = {}
    for outtype in ("f32", "f16", "q8_0"):
        files[outtype] = tmp_path / f"{name}-{outtype}.gguf"
        assert export_gguf(model, smollm2_tokenizer, files[outtype], outtype)["architecture"] == arch
    ids = smollm2_tokenizer.encode(prompts[1])
    ours = _hf_logits(model, ids)
    diffs = {}
    for outtype, path in files.items():
        n_ctx = model.config.max_position_embeddings
        with contextlib.closing(_llama(path, f32_cache=outtype == "f32", n_ctx=n_ctx)) as llm:
            diffs[outtype] = float(np.abs(_llama_logits(llm, ids) - ours).max())
    print(f"\n{name} ({arch}): max |logit| {np.abs(ours).max():.2f}, max |logit diff| "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert all(diffs[outtype] <= TINY_TOL[outtype] for outtype in diffs), diffs
