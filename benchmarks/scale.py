"""Memory per process: one process, DDP and FSDP on the same global batch, and what that means at 7B.

Runs the same 20-step full-parameter `train` and the same 20-step LoRAPrune run (50%, every layer)
on a random-weight model of a named shape, three ways: one process at batch 2B; DDP on two processes
at batch B each (configs/accelerate/ddp.yaml); FSDP on two processes at batch B each
(configs/accelerate/fsdp.yaml). Each run is the project's own `train()` under `accelerate launch`,
measured by its run record: every process's peak tensor memory (on the CPU, the tensor-memory count
that stands in for `torch.cuda.max_memory_allocated`) and the parameter, gradient and optimizer
bytes it holds.

Then it extrapolates to 8 processes and to LLaMA2-7B (random weights; only shapes matter). Per
process, full-parameter training with AdamW holds
    one process or DDP:  P x (weight + gradient + 2 moments) bytes
    FSDP on N processes: the same / N, plus the units gathered whole while they run (the root
                         unit: embeddings, final norm and head, through the whole step; two decoder
                         layers' weights, FSDP prefetching the next, and one layer's gradient)
and the activations on top, which depend on batch, sequence length and checkpointing, not on the
processes (left out of the extrapolation; the measured runs include them). The formula is checked
against the held bytes of the measured runs before it is used.

    python benchmarks/scale.py [--shape smollm2-135m] [--steps 20] [--batch-size 1] [--seq-len 128]
                               [--json benchmarks/results/scale.json]
    python benchmarks/scale.py --report    # docs/results/scale.md from the committed results

Target (issue 16): FSDP's per-process peak for full-parameter training at most 0.6x DDP's on two
processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
CONFIGS = ROOT / "configs" / "accelerate"
MODES = {"one process": None, "DDP": CONFIGS / "ddp.yaml", "FSDP": CONFIGS / "fsdp.yaml"}
JOBS = ("train", "loraprune")
TARGET_FSDP_OVER_DDP = 0.6
GIB, MIB = 2**30, 2**20


# ----------------------------------------------------------------------------------------- worker
def worker(job: str, shape: str, steps: int, batch_size: int, seq_len: int, out: str) -> None:
    """One run, inside `accelerate launch` (or alone): the record of the main process goes to `out`."""
    import torch

    from prunetune.bench.shapes import random_model, shape_config
    from prunetune.training.lora import LoraSettings, add_lora
    from prunetune.methods.loraprune.pruner import LoRAPruner, LoRAPruneSettings
    from prunetune.structure.units import Structure
    from prunetune.training.loop import TrainSettings, make_accelerator, train

    config = shape_config(shape, seq_len)
    model = random_model(config, torch.device("cpu"), torch.float32)
    settings = TrainSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=1e-4)
    accelerator = make_accelerator(settings)
    blocks = torch.randint(0, config.vocab_size, (256, seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(blocks, dtype=torch.bool)
    hooks = None
    if job == "train":
        model.requires_grad_(True)
    else:
        structure = Structure.of(model)
        torch.manual_seed(0)
        model = add_lora(model, LoraSettings(dropout=0.0))
        hooks = LoRAPruner(model, structure, ratio=0.5, layers=list(range(structure.num_layers)),
                           units=("heads", "channels"), head_unit="kv-group", round_to=1, allocation="uniform",
                           settings=LoRAPruneSettings(), total_steps=steps)
    parameters = sum(p.numel() for p in model.parameters())
    result = train(model, blocks, mask, settings, hooks=hooks, accelerator=accelerator, progress=False, log=None)
    if accelerator.is_main_process:
        record = result.record(settings)
        processes = record.get("processes") or {"count": 1, "mode": "one process",
                                                 "peak_memory_bytes": [record["peak_memory_bytes"]],
                                                 "state_bytes": [result.held_bytes]}
        Path(out).write_text(json.dumps({"parameters": parameters, "seconds": record["seconds"],
                                         "peak_memory_kind": record["peak_memory_kind"], "processes": processes}))


# ----------------------------------------------------------------------------------------- driver
def launch(mode: str, job: str, args, batch_size: int, out: Path) -> dict:
    config = MODES[mode]
    script = [str(Path(__file__).resolve()), "--worker", job, "--shape", args.shape, "--steps", str(args.steps),
              "--batch-size", str(batch_size), "--seq-len", str(args.seq_len), "--out", str(out)]
    if config is None:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2", "--mixed_precision", "no", *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // (1 if config is None else 2))))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{mode} {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def shape_numbers(shape: str) -> dict:
    """Parameter counts of a named shape: the whole model, one decoder layer, the root unit."""
    from prunetune.bench.shapes import SHAPES

    s = SHAPES[shape]
    h, i, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    head_dim = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    layer = h * h * 2 + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    root = vocab * h * (1 if s["tie_word_embeddings"] else 2) + h
    return {"total": layers * layer + root, "layer": layer, "root": root}


def predicted_state(parameters: int, processes: int, sharded: bool, bytes_per_value: int = 4) -> int:
    """Weights, gradients and AdamW's two moments held per process (in the weights' dtype)."""
    whole = parameters * bytes_per_value * 4
    return -(-whole // processes) if sharded else whole


def extrapolate(shape: str, processes: int, bytes_per_value: int) -> dict:
    n = shape_numbers(shape)
    state = predicted_state(n["total"], processes, False, bytes_per_value)
    sharded = predicted_state(n["total"], processes, True, bytes_per_value)
    gathered = bytes_per_value * (2 * n["root"] + 2 * n["layer"] + n["layer"])
    return {"shape": shape, "processes": processes, "bytes_per_value": bytes_per_value,
            "parameters": n["total"], "ddp_state_bytes": state, "fsdp_state_bytes": sharded,
            "fsdp_gathered_bytes": gathered, "fsdp_bytes": sharded + gathered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1, help="per process of the two; one process runs 2x")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--worker", choices=JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    _report.add_options(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.shape, args.steps, args.batch_size, args.seq_len, args.out)
    if args.report:
        return report(json.loads(RESULTS.read_text()), args.out_dir)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in JOBS:
            for mode in MODES:
                batch = args.batch_size * (2 if MODES[mode] is None else 1)
                console.print(f"[dim]{job}, {mode}, batch {batch} per process ...[/dim]")
                record = launch(mode, job, args, batch, Path(tmp) / f"{job}-{mode}.json")
                runs.append({"job": job, "mode": mode, "batch_per_process": batch} | record)

    table = Table(title=f"{args.steps} steps on a random {args.shape}, global batch {2 * args.batch_size} x "
                        f"{args.seq_len}, fp32, per process ({runs[0]['peak_memory_kind']})")
    for column in ("run", "processes", "peak MiB", "held after the last step: weights / optimizer MiB", "vs DDP", "s"):
        table.add_column(column)
    ratios = {}
    for run in runs:
        p = run["processes"]
        peak = max(p["peak_memory_bytes"])
        ddp = next(r for r in runs if r["job"] == run["job"] and r["mode"] == "DDP")
        ratio = peak / max(ddp["processes"]["peak_memory_bytes"])
        ratios[(run["job"], run["mode"])] = ratio
        held = p["state_bytes"][0]
        table.add_row(f"{run['job']}: {run['mode']}", str(p["count"]), f"{peak / MIB:,.0f}",
                      " / ".join(f"{held[k] / MIB:,.0f}" for k in ("parameters", "optimizer")),
                      f"{ratio:.2f}", f"{run['seconds']:.0f}")
    console.print(table)

    # The state formula against what the full-parameter runs held after their last step: weights and
    # AdamW's two moments (the gradients, weight-sized, exist during each step and are freed after it).
    checks = []
    for run in runs:
        if run["job"] != "train":
            continue
        held = run["processes"]["state_bytes"][0]
        measured = held["parameters"] + held["optimizer"]
        predicted = predicted_state(run["parameters"], run["processes"]["count"], run["mode"] == "FSDP") * 3 // 4
        checks.append({"mode": run["mode"], "measured": measured, "predicted": predicted,
                       "error": (predicted - measured) / measured})
        console.print(f"weights + moments per process, {run['mode']}: measured {measured / GIB:.3f} GiB, formula "
                      f"{predicted / GIB:.3f} GiB ({checks[-1]['error']:+.2%})")
    target_value = ratios[("train", "FSDP")]
    met = target_value <= TARGET_FSDP_OVER_DDP
    console.print(f"target: FSDP peak <= {TARGET_FSDP_OVER_DDP}x DDP's for full-parameter training: "
                  f"{target_value:.2f} {'[green]met[/green]' if met else '[red]missed[/red]'}")

    extrapolations = [extrapolate(shape, n, b) for shape in ("llama-7b",) for n in (2, 8) for b in (4, 2)]
    table = Table(title="Full-parameter AdamW per process, extrapolated (activations not included)")
    for column in ("shape", "dtype", "processes", "DDP state GiB", "FSDP state GiB", "+ gathered units GiB",
                   "FSDP GiB"):
        table.add_column(column)
    for e in extrapolations:
        table.add_row(e["shape"], {4: "fp32", 2: "bf16"}[e["bytes_per_value"]], str(e["processes"]),
                      f"{e['ddp_state_bytes'] / GIB:.1f}", f"{e['fsdp_state_bytes'] / GIB:.1f}",
                      f"{e['fsdp_gathered_bytes'] / GIB:.1f}", f"{e['fsdp_bytes'] / GIB:.1f}")
    console.print(table)

    import torch

    result = {"command": _report.invocation("scale"), "machine": _report.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"),
              "settings": {"shape": args.shape, "steps": args.steps, "batch_per_process": args.batch_size,
                           "seq_len": args.seq_len},
              "runs": runs, "state_formula_checks": checks, "extrapolations": extrapolations,
              "target": {"fsdp_over_ddp_max": TARGET_FSDP_OVER_DDP, "value": target_value, "met": met}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.json}")


JOB_NAMES = {"train": "full-parameter `train`", "loraprune": "LoRAPrune 50%"}


def report(results: dict, out_dir: Path) -> None:
    """The measured runs, the state formula against them, and the formula at LLaMA2-7B's size."""
    s, runs = results["settings"], results["runs"]
    provenance = _report.provenance(results["command"], results["machine"], results["date"], results.get("torch"))
    rows = []
    for run in runs:
        p = run["processes"]
        peak = max(p["peak_memory_bytes"])
        ddp = next(r for r in runs if r["job"] == run["job"] and r["mode"] == "DDP")
        held = p["state_bytes"][0]
        name = f"{JOB_NAMES.get(run['job'], run['job'])}, " + (
            f"one process (batch {run['batch_per_process']})" if run["mode"] == "one process" else run["mode"])
        rows.append([name, p["count"], f"{peak / MIB:,.0f}",
                     f"{held['parameters'] / MIB:,.0f} / {held['optimizer'] / MIB:,.0f}",
                     f"{peak / max(ddp['processes']['peak_memory_bytes']):.2f}", f"{run['seconds']:.0f}"])
    target = results["target"]
    measured = _report.section(
        "Peak memory per process", provenance,
        f"{s['steps']} steps on a random {s['shape']} in fp32 at a global batch of {2 * s['batch_per_process']} x "
        f"{s['seq_len']}; peak: {runs[0]['peak_memory_kind']}, the largest over the processes. Target: FSDP's peak "
        f"for full-parameter training at most {target['fsdp_over_ddp_max']}x DDP's: {target['value']:.2f}, "
        f"{'met' if target['met'] else 'missed'}.",
        _report.table(["run", "processes", "peak MiB per process", "held after the run: weights / AdamW state MiB",
                       "vs DDP", "s"], rows))
    checks = _report.section(
        "The state formula against the held bytes", provenance,
        "Weights and AdamW's two moments held per process after the last full-parameter step, against "
        "P x (weight + 2 moments) / N.",
        _report.table(["run", "measured GiB", "formula GiB", "error"],
                      [[c["mode"], f"{c['measured'] / GIB:.3f}", f"{c['predicted'] / GIB:.3f}", f"{c['error']:+.5%}"]
                       for c in results["state_formula_checks"]]))
    extrapolated = _report.section(
        "Full-parameter AdamW per process, extrapolated (activations not included)", provenance,
        _report.table(["shape", "dtype", "processes", "DDP state GiB", "FSDP state GiB", "+ gathered units GiB",
                       "FSDP GiB"],
                      [[e["shape"], {4: "fp32", 2: "bf16"}[e["bytes_per_value"]], e["processes"],
                        f"{e['ddp_state_bytes'] / GIB:.1f}", f"{e['fsdp_state_bytes'] / GIB:.1f}",
                        f"{e['fsdp_gathered_bytes'] / GIB:.1f}", f"{e['fsdp_bytes'] / GIB:.1f}"]
                       for e in results["extrapolations"]]))
    _report.write_page("scale", [_report.relative(RESULTS)], [measured, checks, extrapolated], out_dir)


if __name__ == "__main__":
    main()
