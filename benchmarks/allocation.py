"""How a layer's budget is shared by heads and channels: the cost split against heads-first.

Scores every unit of the real SmolLM2-135M once (taylor: LLM-Pruner's first-order criterion, and
lora-guided: LoRAPrune's criterion from one fresh adapter, both from the same 10 calibration
sequences of 128 tokens), then for each ratio, head unit and split rule masks the model (no training,
so the split's own effect is seen) and measures held-out perplexity on builtin:pydoc and
builtin:stdlib-code. Layers 'paper' and uniform allocation, as LoRAPrune's defaults.

    python benchmarks/allocation.py [--ratios 0.2,0.5] [--head-units kv-group,q-head] [--windows 10]

Rows are merged into benchmarks/results/allocation.json by (criterion, ratio, head unit, split), so
a rerun of some rows keeps the others; the table printed is the file's, and `--report` writes it to
docs/results/allocation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _report  # benchmarks/_report.py (benchmarks/ is the script's directory)

EVAL_SETS = ("builtin:pydoc@eval", "builtin:stdlib-code@eval")
RESULTS = Path(__file__).resolve().parent / "results" / "allocation.json"


def row_key(row: dict) -> str:
    return "/".join(str(row.get(k, "")) for k in ("criterion", "ratio", "head_unit", "split"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--criteria", default="taylor,lora-guided")
    parser.add_argument("--windows", type=int, default=20, help="perplexity windows of 256 tokens per data set")
    parser.add_argument("--head-units", default=None, help="default: every head unit")
    parser.add_argument("--results", default=str(RESULTS))
    _report.add_options(parser)
    args = parser.parse_args()
    if args.report:
        stored = json.loads(Path(args.results).read_text())
        rows = list(stored["rows"].values())
        _report.write_page("allocation", [_report.relative(args.results)], [_report.section(
            "Perplexity after masking, per split rule",
            _report.provenance([r["command"] for r in rows], [r["machine"] for r in rows], [r["date"] for r in rows],
                               [r.get("torch") for r in rows]),
            "Masks only (no training), layers 'paper', uniform allocation; perplexity over the first "
            + " or ".join(str(w) for w in sorted({r["windows"] for r in rows})) + " windows of 256 tokens of "
            "each held-out set.", table(stored))], args.out_dir)
        return
    run(args)


def run(args) -> None:
    import torch

    from prunetune import load_model
    from prunetune.data import load_blocks
    from prunetune.evaluate.perplexity import perplexity
    from prunetune.importance import CRITERIA
    from prunetune.structure.allocate import SPLITS, achieved_ratio, parse_layers, select_masks
    from prunetune.structure.masks import apply_masks
    from prunetune.structure.units import HEAD_UNITS, Structure

    model, tokenizer = load_model(args.model)
    structure = Structure.of(model)
    layers = parse_layers("paper", structure.num_layers)
    blocks, _ = load_blocks("builtin:pydoc", tokenizer, 128, default_split="train")
    batches = list(blocks[:10].split(2))

    def ppl() -> dict:
        return {spec: perplexity(model, tokenizer, spec, 256, max_windows=args.windows, progress=False).perplexity
                for spec in EVAL_SETS}

    rows = [{"criterion": "dense", "perplexity": ppl()}]
    for criterion in args.criteria.split(","):
        scores = CRITERIA[criterion](model, batches, seed=0)
        for ratio in (float(r) for r in args.ratios.split(",")):
            for head_unit in (args.head_units or ",".join(HEAD_UNITS)).split(","):
                for split in SPLITS:
                    masks = select_masks(structure, scores, ratio, layers, ("heads", "channels"), head_unit, "auto",
                                         "uniform", split)
                    with apply_masks(model, masks):
                        result = ppl()
                    kv = masks.kv_heads(layers[0], structure)
                    heads = masks.heads.get(layers[0])
                    channels = masks.channels.get(layers[0])
                    row = {"criterion": criterion, "ratio": ratio, "head_unit": head_unit, "split": split,
                           "ratio_achieved": achieved_ratio(structure, masks, layers, ("heads", "channels")),
                           "layer_shape": {
                               "q_heads": structure.layers[0].num_heads if heads is None else int(heads.sum()),
                               "kv_heads": structure.layers[0].num_kv_heads if kv is None else int(kv.sum()),
                               "channels": (structure.layers[0].intermediate if channels is None
                                            else int(channels.sum()))},
                           "perplexity": result}
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    path = Path(args.results)
    stored = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    for row in rows:
        stored["rows"][row_key(row)] = row | {"machine": _report.machine(), "torch": torch.__version__,
                                             "date": time.strftime("%Y-%m-%d"), "windows": args.windows,
                                             "command": _report.invocation("allocation")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    print(f"\nmasks only (no training), layers 'paper', uniform allocation; perplexity over {args.windows} windows "
          "of 256 tokens")
    print(table(stored))


def table(stored: dict) -> str:
    """The dense row first, then the others by criterion, ratio, head unit and split."""
    rows = [stored["rows"]["dense///"]] + [r for k, r in sorted(stored["rows"].items()) if k != "dense///"]
    dense = rows[0]["perplexity"]
    lines = [["dense", "", "", "", "9 / 3, 1536", 0, f"{dense[EVAL_SETS[0]]:.2f}", f"{dense[EVAL_SETS[1]]:.2f}"]]
    for r in rows[1:]:
        shape = r["layer_shape"]
        lines.append([r["criterion"], f"{r['ratio']:.0%}", r["head_unit"], r["split"],
                      f"{shape['q_heads']} / {shape['kv_heads']}, {shape['channels']}", f"{r['ratio_achieved']:.3f}",
                      f"{r['perplexity'][EVAL_SETS[0]]:.2f}", f"{r['perplexity'][EVAL_SETS[1]]:.2f}"])
    return _report.table(["criterion", "ratio", "head unit", "split", "pruned layer keeps (q / kv heads, channels)",
                          "achieved", "pydoc", "stdlib-code"], lines)


if __name__ == "__main__":
    main()
