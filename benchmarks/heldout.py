"""LoRAPrune against the strongest baselines a user could run instead, at equal size and equal training
tokens, scored on text nobody here tuned to. SmolLM2-135M, 20% and 50%.

Every method calibrates and trains on one domain (builtin:pydoc's training split) and is scored on
three: pydoc's held-out tenth (the training domain), the standard library's code (builtin:stdlib-code's
held-out tenth) and the Debian Administrator's Handbook (English prose from another world, whole; see
benchmarks/handbook.py, which installs it), in 512-token windows.

The rows:
- `loraprune`: prunetune's default, `prunetune prune --method loraprune` with its defaults. Its
  parameter count at each ratio (seed 0) is the size every other row is cut to, within 1%.
- `one-shot`: prunetune's best one-shot configuration, chosen by measurement: each candidate criterion,
  layer choice, allocation and split (SELECTION) is cut to that size and scored, masks only, on the
  training domain's held-out text (never on the other two); the best one then gets the recovery below.
- `torch-pruning`: Torch-Pruning's first-order Taylor importance on MLP channels (the way its Llama
  example prunes without heads; benchmarks/torch_pruning_peer.py), installed with
  `pip install torch-pruning` as a user would, then the same recovery.
- `loraprune-paper`: the LoRAPrune paper's recipe, so its claim stays checkable.
- `dense-lora`: the unpruned model after the same recovery, what a pruned model is up against.

The recovery every baseline gets is `prunetune train --lora` for as many steps, sequences and tokens
as LoRAPrune trains, with the loss LoRAPrune's default uses: half next-token loss, half distillation
from the unpruned model. Only the choice of what to cut differs.

    python benchmarks/heldout.py                  # run the missing cells in order (resumable; one worker per core)
    python benchmarks/heldout.py --only 0.2/torch-pruning/1
    python benchmarks/heldout.py --report         # docs/results/heldout.md (heldout_tables.py)

Each finished cell goes into benchmarks/results/heldout.json at once; run directories stay in runs/heldout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)
from _cells import check_settings, claim, load_results, release, save_cell
from handbook import handbook_spec
from heldout_plan import (
    AT_LORAPRUNE_SHAPE, DEFAULT, DEPTH_ROWS, DOMAINS, ROWS, SELECTION, SHEAR, SHEAR_STEPS, SHEARED_TRAINING, SWEEP,
    best_candidate, plan,
)
from heldout_tables import write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "heldout.json"
SCRIPT = "heldout.py"


def prunetune(*args: str) -> None:
    command = [sys.executable, "-m", "prunetune.cli", *args]
    print("$ prunetune", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def record(run: Path) -> dict:
    return json.loads((run / "prunetune.json").read_text())


def evaluate(model: Path | str, args, out_json: Path, domains=DOMAINS, windows: int | None = None) -> dict:
    specs = {"pydoc": "builtin:pydoc@eval", "stdlib-code": "builtin:stdlib-code@eval", "handbook": handbook_spec()}
    prunetune("eval", str(model), "--data", ",".join(specs[d] for d in domains), "--seq-len", str(args.eval_seq_len),
              "--max-windows", str(windows or args.eval_windows), "--json", str(out_json))
    scored = json.loads(out_json.read_text())["perplexity"]
    return {d: {"perplexity": r["perplexity"], "tokens": r["tokens_scored"]} for d, r in zip(domains, scored)}


def common(args, seed: int) -> list[str]:
    return ["--data", args.data, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--lr", str(args.lr), "--seed", str(seed)]


def structure(model: str) -> dict:
    """The source's parameter count, prunable parameters per layer choice (heads and channels) and shape."""
    code = ("import json,sys; from prunetune.models import load_model; from prunetune.structure.units import "
            "Structure; from prunetune.structure.allocate import parse_layers, parse_units\n"
            "m,_=load_model(sys.argv[1], dtype='float32', device='cpu'); s=Structure.of(m)\n"
            "u=parse_units('heads,channels')\n"
            "print(json.dumps({'total': sum(p.numel() for p in m.parameters()), 'prunable': "
            "{l: s.prunable_params(parse_layers(l, s.num_layers), u) for l in ('paper','all')}, "
            "'hidden': s.hidden, 'layers': s.num_layers, 'intermediate': s.layers[0].intermediate}))")
    out = subprocess.run([sys.executable, "-c", code, model], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ratio_for(args, target: int, layers: str) -> float:
    """The --ratio that removes what a model of `target` parameters lacks, over `layers`' prunable parameters."""
    source = args.structure
    return round((source["total"] - target) / source["prunable"][layers], 5)


def sheared_width(args, target: int) -> int:
    """The MLP width that, in every layer with every head kept, leaves a model of `target` parameters."""
    source = args.structure
    per_channel = 3 * source["hidden"] * source["layers"]  # a gate row, an up row and a down column per layer
    return round(source["intermediate"] - (source["total"] - target) / per_channel)


def loraprune_shape(args, ratio: float) -> Path:
    """A per-layer `shear` target: the config.json of a LoRAPrune result at this ratio on the default's
    layers (the row's or a change of its score or schedule). Uniform allocation fixes each layer's
    counts at a size, so every such result has one shape (checked here); the scores choose only which
    units. The first one found is kept beside the results (`heldout-inputs/loraprune-shape-RATIO.json`,
    an input, not a result with a page), so the changes that use it run again where the LoRAPrune runs'
    directories are gone."""
    kept = args.results.parent / "heldout-inputs" / f"loraprune-shape-{ratio}.json"
    runs = [name for name, (_, row, extra) in SWEEP.items() if row == DEFAULT and layers_of(extra) == "paper"]
    configs = [c for name in (DEFAULT, *runs) for c in sorted(args.runs.glob(f"{ratio}-{name}-[0-9]/config.json"))]
    configs += [kept] if kept.exists() else []
    shapes = {json.dumps(json.loads(c.read_text())["prunetune_layer_shapes"]) for c in configs}
    if len(shapes) != 1:
        raise SystemExit(f"{len(configs)} LoRAPrune results at {ratio} with {len(shapes)} shapes in {args.runs} "
                         f"and {kept}; run a LoRAPrune cell at {ratio} first")
    if not kept.exists():
        kept.parent.mkdir(exist_ok=True)
        shutil.copyfile(configs[0], kept)
    return kept


def target(results: dict, ratio: float) -> int | None:
    cell = results["cells"].get(f"{ratio}/{DEFAULT}/0")
    return cell and cell["parameters"]


def layers_of(prune_args: str) -> str:
    words = prune_args.split()
    return words[words.index("--layers") + 1] if "--layers" in words else "paper"


def recover(args, model: Path, out: Path, seed: int, extra: list[str] = ()) -> dict:
    """The same LoRA recovery for every baseline: LoRAPrune's steps, batch, tokens, learning rate and loss."""
    prunetune("train", str(model), "--data", f"train={args.data}", "--fixed-mixture", "--lora", "--steps",
              str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr",
              str(args.lr), "--seed", str(seed), "--distill", "--teacher", args.model, "--distill-alpha", "0.5",
              *extra, "--no-eval", "--out", str(out), "--overwrite")
    return record(out)


def training_summary(rec: dict) -> dict:
    t = rec["training"]
    return {"train_seconds": t["seconds"], "seconds_per_step": t["seconds"] / len(t["history"]),
            "peak_memory_bytes": t["peak_memory_bytes"], "peak_rss_bytes": t.get("peak_rss_bytes")}


def both_phases(cell: dict, shear: dict) -> dict:
    """The sheared row's time and memory over its two runs (shear, then train): the table's s/step is
    their total over all the steps, its peak the larger; each phase's own figures kept beside."""
    steps = cell["steps"]
    return {f"shear_{k}": v for k, v in shear.items()} | {
        "train_seconds": cell["train_seconds"] + shear["train_seconds"],
        "seconds_per_step": (cell["train_seconds"] + shear["train_seconds"]) / steps,
        "peak_memory_bytes": max(cell["peak_memory_bytes"], shear["peak_memory_bytes"]),
        "peak_rss_bytes": max(cell["peak_rss_bytes"] or 0, shear["peak_rss_bytes"] or 0),
        "train_phase": {k: cell[k] for k in ("train_seconds", "seconds_per_step", "peak_memory_bytes",
                                             "peak_rss_bytes")}}


def run_selection(args, ratio: float, name: str, results: dict) -> dict:
    out = args.runs / f"select-{ratio}-{name.replace('/', '-')}"
    layers = layers_of(SELECTION[name])
    prunetune("prune", args.model, "--ratio", str(ratio_for(args, target(results, ratio), layers)),
              *common(args, 0), *SELECTION[name].split(), "--calib-samples", "10", "--no-eval", "--out", str(out),
              "--overwrite")
    rec = record(out)
    cell = {"ratio": ratio, "candidate": name, "parameters": rec["parameters"]["after"]["total"],
            "perplexity": evaluate(out, args, out / "eval.json", domains=("pydoc",), windows=args.select_windows)}
    shutil.rmtree(out)  # 500 MB of weights nobody reads again
    return cell


def pruned_dir(args, ratio: float | None, row: str, seed: int, variant: str | None) -> Path:
    """Where a baseline's pruned model waits for its recovery (the sheared row's for its training):
    one per cell, since two cells of one row may run at once."""
    return args.runs / f"{ratio}-{variant or row}-{seed}-pruned"


def run_row(args, ratio: float | None, row: str, seed: int, results: dict, variant: str | None = None) -> dict:
    """One row's run at one seed; `variant` (a SWEEP name) adds its arguments to the row's."""
    out = args.runs / f"{ratio}-{variant or row}-{seed}"
    started = time.time()
    commands = []
    changed = SWEEP[variant][2].split() if variant else []
    if row == "sheared":
        sheared = pruned_dir(args, ratio, row, seed, variant)
        half = SHEAR_STEPS.get(variant, args.steps // 2)
        each = ["--data", f"train={args.data}", "--fixed-mixture", "--batch-size", str(args.batch_size), "--seq-len",
                str(args.seq_len), "--seed", str(seed), "--no-eval", "--overwrite"]
        # A change goes to both runs, after the row's own flags: the last of a repeated flag wins.
        target_spec = (str(loraprune_shape(args, ratio)) if variant in AT_LORAPRUNE_SHAPE
                       else f"intermediate={sheared_width(args, target(results, ratio))}")
        prunetune("shear", args.model, "--target", target_spec,
                  *SHEAR.split(), *SHEARED_TRAINING.split(), "--steps", str(half), *each, *changed, "--out",
                  str(sheared))
        prunetune("train", str(sheared), *SHEARED_TRAINING.split(), "--steps", str(args.steps - half), *each, *changed,
                  "--out", str(out))
        final = out
    elif row in ("loraprune", "loraprune-paper"):
        extra = ROWS[row][1].format(steps=args.steps).split() + changed
        layers = layers_of(" ".join(changed))  # a change of layers prunes another share of them to the same size
        r = ratio if row == DEFAULT and layers == "paper" else ratio_for(args, target(results, ratio), layers)
        prunetune("prune", args.model, "--ratio", str(r), *common(args, seed), *extra, "--no-eval", "--out", str(out),
                  "--overwrite")
        final = out
    else:
        pruned = pruned_dir(args, ratio, row, seed, variant)
        if row == "one-shot":
            chosen = best_candidate(results, ratio)
            prune_args = SELECTION[chosen].split()
            prunetune("prune", args.model, "--ratio",
                      str(ratio_for(args, target(results, ratio), layers_of(SELECTION[chosen]))),
                      *common(args, seed), *prune_args, "--calib-samples", "10", "--no-eval", "--out", str(pruned),
                      "--overwrite")
        elif row in DEPTH_ROWS:
            chosen = None
            prunetune("prune", args.model, "--ratio", str(ratio_for(args, target(results, ratio), "all")),
                      *common(args, seed), *DEPTH_ROWS[row].split(), "--calib-samples", "10", "--no-eval",
                      "--out", str(pruned), "--overwrite")
            shape = record(pruned)
        elif row == "torch-pruning":
            chosen = None
            subprocess.run([sys.executable, str(HERE / "torch_pruning_peer.py"), args.model, "--params",
                            str(target(results, ratio)), "--out", str(pruned), "--data", args.data,
                            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)], check=True)
        else:  # dense-lora
            chosen, pruned = None, args.model
        rec = recover(args, pruned, out, seed, changed)
        final = out
        commands.append(f"candidate {chosen}" if chosen else row)
    rec = record(final)
    cell = {"ratio": ratio, "row": row, "seed": seed, "steps": args.steps,
            "parameters": rec["parameters"]["after"]["total"] if "after" in rec["parameters"]
            else rec["parameters"].get("total"),
            "perplexity": evaluate(final, args, final / "eval.json"),
            **training_summary(rec), "wall_seconds": round(time.time() - started, 1),
            "date": time.strftime("%Y-%m-%d"), "machine": _report.machine(), "torch": rec.get("torch")}
    if variant:
        cell["variant"] = variant
    if row == "one-shot":
        cell["candidate"] = best_candidate(results, ratio)
    if row in DEPTH_ROWS:
        cell["layers_removed"] = shape.get("depth", {}).get("layers_removed", [])
        cell["layer_shape"] = shape["architecture"]["layer_shapes"][0]
    if ratio is not None and target(results, ratio):
        cell["size_vs_default"] = cell["parameters"] / target(results, ratio)
    if row == "sheared":
        sheared = record(pruned_dir(args, ratio, row, seed, variant))
        cell["layer_shape"] = sheared["architecture"]["layer_shapes"][0]
        if variant in AT_LORAPRUNE_SHAPE:
            cell["layer_shapes"] = sheared["architecture"]["layer_shapes"]
        cell |= both_phases(cell, training_summary(sheared))
    shutil.rmtree(pruned_dir(args, ratio, row, seed, variant), ignore_errors=True)
    return cell


def work(args, settings: dict) -> None:
    wanted = set(args.only or [])
    todo = [c for c in plan() if not wanted or c[0] in wanted]
    while True:
        results = load_results(args.results)
        pending = [c for c in todo if c[0] not in results["cells"]]
        if not pending:
            return
        ran = False
        for key, kind, ratio, name, seed, needs in pending:
            if any(n not in results["cells"] for n in needs) or not claim(args.runs, key, SCRIPT):
                continue
            print(f"== cell {key}", flush=True)
            if kind == "dense":
                cell = {"perplexity": evaluate(args.model, args, args.runs / "dense-eval.json"),
                        "parameters": args.structure["total"], "date": time.strftime("%Y-%m-%d"),
                        "machine": _report.machine()}
            elif kind == "select":
                cell = run_selection(args, ratio, name, results)
            elif kind == "sweep":
                cell = run_row(args, ratio, SWEEP[name][1], seed, results, variant=name)
            else:
                cell = run_row(args, ratio, name, seed, results)
            save_cell(args.results, key, cell, settings)
            release(args.runs, key)
            ran = True
            break
        if not ran:
            if args.only and all(any(n not in load_results(args.results)["cells"] for n in c[5]) for c in pending):
                raise SystemExit(f"{', '.join(c[0] for c in pending)} need cells not yet run: "
                                 f"{sorted({n for c in pending for n in c[5]})}")
            time.sleep(20)  # the rest is claimed by other workers, or waits on what they run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--data", default="builtin:pydoc")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--select-windows", type=int, default=20)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=Path, default=Path("runs/heldout"))
    parser.add_argument("--only", action="append", help="run just this cell (e.g. 0.2/torch-pruning/1); repeatable")
    _report.add_options(parser)
    args = parser.parse_args()

    results = load_results(args.results)
    settings = {k: v for k, v in vars(args).items() if k in ("model", "steps", "batch_size", "seq_len", "lr", "data",
                                                             "eval_seq_len", "eval_windows", "select_windows")}
    if args.report:
        write_report(results, args.results, args.out_dir)
        return
    check_settings(results, settings, args.results)
    args.runs.mkdir(parents=True, exist_ok=True)
    args.structure = structure(args.model)
    work(args, settings)
    write_report(load_results(args.results), args.results, Path("/tmp/heldout-page"))


if __name__ == "__main__":
    main()
