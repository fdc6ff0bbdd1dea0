"""Fast shapes: inference speed of a LLaMA-7B-shaped model, dense and pruned, with prunetune's default
rounding of MLP widths and without it.

  1. Save a randomly initialised LLaMA-7B-shaped model (hidden 4096, 32 heads of 128, MLP 11008,
     vocab 32000, 4096 positions) with a placeholder tokenizer to WORK/dense (bf16 by default).
  2. Prune it with the command line, magnitude criterion, every layer alike:
         prunetune prune WORK/dense --method magnitude --ratio R --layers all --no-eval --out WORK/pruned-...
     at 20% and 50% with the default rounding, and at 20% with `--round-to 1` for contrast (the
     unrounded widths; on an H100, MLP width 8806 prefilled 45% slower than dense).
  3. Save a LoRA adapter (PEFT, r 8 on q,k,v,o,gate,up,down, random A and B) for the 20% model.
  4. Measure [dense, 20%, 20% unrounded, 50%] with the speed benchmark (what `prunetune bench`
     prints), plus the 20% model with the adapter unmerged and merged (LoRAPrune's Table 3: an
     unmerged LoRA on a 20%-pruned model was slower than the merged dense model), and check: every
     default-rounded model's prefill latency is at most the dense one's;
     at 50% the prefill latency ratio is at most 1.1 x the FLOPs ratio.

On a GPU (the table in docs/guides/evaluation.md; about 45 GB of disk for the four bf16 models, 2-3 minutes to
build and prune, and a few minutes to measure):

    python benchmarks/speed.py --json speed-7b.json

uses 32 layers, a 2048-token prompt, 128 decode tokens, bf16, 2 warm-up and 5 timed runs. Without a
GPU the defaults shrink to 2 layers (a full 7B does not fit or takes far too long on a small CPU),
a 512-token prompt, 32 decode tokens, fp32 compute, 1 warm-up and 3 timed runs; the output says so.
Any default can be overridden (`--layers 32 --prompt-len 2048` ...). `--work DIR` keeps the models
(and reuses them on the next run); by default they go to a temporary directory.

Nothing is downloaded: the weights are random; only shapes matter for time and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from prunetune.bench.shapes import save_random_model, shape_config
from prunetune.bench.speed import SpeedSettings, bench_speed
from prunetune.bench.speed_table import result_notes, result_table

# name, ratio, extra `prunetune prune` arguments
PRUNED = (("pruned-20", 0.2, ()), ("pruned-20-unrounded", 0.2, ("--round-to", "1")), ("pruned-50", 0.5, ()))
DEFAULT_ROUNDED = ("pruned-20", "pruned-50")


def parse_args(gpu: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-7b", help="named shape of the random model (tiny: a quick check)")
    parser.add_argument("--layers", type=int, default=32 if gpu else 2, help="decoder layers (LLaMA-7B: 32)")
    parser.add_argument("--prompt-len", type=int, default=2048 if gpu else 512)
    parser.add_argument("--decode-tokens", type=int, default=128 if gpu else 32)
    parser.add_argument("--warmup", type=int, default=2 if gpu else 1)
    parser.add_argument("--repeats", type=int, default=5 if gpu else 3)
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on a GPU, fp32 on the CPU), ...")
    parser.add_argument("--save-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the saved models")
    parser.add_argument("--work", type=Path,
                        help="keep the models here (reused if present); default: a temporary directory")
    parser.add_argument("--json", type=Path, help="write the measurements to this file")
    return parser.parse_args()


def build_models(work: Path, args, console: Console) -> None:
    if not (work / "dense" / "config.json").exists():
        config = shape_config(args.shape, num_hidden_layers=args.layers, max_position_embeddings=4096)
        console.print(f"saving a random {args.shape}-shaped model ({args.layers} layers, {args.save_dtype}) "
                      f"to {work / 'dense'}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        save_random_model(config, work / "dense", getattr(torch, args.save_dtype), device=device)
    for name, ratio, extra in PRUNED:
        if (work / name / "config.json").exists():
            continue
        command = ["prunetune", "prune", str(work / "dense"), "--method", "magnitude", "--ratio", str(ratio),
                   "--layers", "all", "--no-eval", "--dtype", args.save_dtype, *extra, "--out", str(work / name)]
        console.print(" ".join(command))
        done = subprocess.run([sys.executable, "-m", "prunetune.cli", *command[1:]], capture_output=True, text=True,
                              env=dict(os.environ, COLUMNS="120"))
        if done.returncode != 0:
            sys.exit(f"pruning failed:\n{done.stdout}\n{done.stderr}")


def build_adapter(work: Path, console: Console) -> Path:
    """A random rank-8 adapter for the 20% model: only its shapes matter for speed."""
    path = work / "adapter-20"
    if (path / "adapter_config.json").exists():
        return path
    from prunetune import load_model
    from prunetune.training.lora import LoraSettings, add_lora

    console.print(f"saving a random LoRA adapter (r 8, all projections) for pruned-20 to {path}")
    model, _ = load_model(str(work / "pruned-20"), device="cpu", dtype="bfloat16")
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)  # PEFT starts B at zero; a trained adapter is not
    model.save_pretrained(path)
    return path


def shapes_table(work: Path) -> Table:
    table = Table(title="shapes (every layer alike)")
    for column in ("model", "query heads", "kv heads", "MLP width", "width / 128", "ratio removed"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in ("dense", *(p[0] for p in PRUNED)):
        config = json.loads((work / name / "config.json").read_text())
        record = work / name / "prunetune.json"
        ratio = json.loads(record.read_text())["parameters"]["ratio_achieved"] if record.exists() else 0.0
        width = config["intermediate_size"]
        table.add_row(name, str(config["num_attention_heads"]), str(config["num_key_value_heads"]), str(width),
                      f"{width / 128:g}", f"{ratio:.3f}")
    return table


def checks(result) -> list[tuple[str, bool | None, str]]:
    rows = {row.model: row for row in result.rows}
    found = []
    for name in DEFAULT_ROUNDED:
        ratio = result.ratios(rows[name])["prefill_ratio"]
        detail = "not measured" if ratio is None else f"latency ratio {ratio:.2f}"
        found.append((f"{name} (default rounding) prefills no slower than dense",
                      None if ratio is None else ratio <= 1.0, detail))
    r = result.ratios(rows["pruned-50"])
    if r["prefill_ratio"] is None:
        found.append(("pruned-50 latency ratio <= 1.1 x FLOPs ratio", None, "not measured"))
    else:
        found.append(("pruned-50 latency ratio <= 1.1 x FLOPs ratio", r["prefill_ratio"] <= 1.1 * r["flops_ratio"],
                      f"latency ratio {r['prefill_ratio']:.3f}, FLOPs ratio {r['flops_ratio']:.3f}, "
                      f"limit {1.1 * r['flops_ratio']:.3f}"))
    return found


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    gpu = torch.cuda.is_available()
    args = parse_args(gpu)
    console = Console(width=140)
    if not gpu:
        console.print(f"no GPU: {args.layers} of LLaMA-7B's 32 layers (a full 7B does not fit or takes far too long "
                      f"on this CPU), a {args.prompt_len}-token prompt, {args.decode_tokens} decode tokens, "
                      f"{args.warmup} warm-up + {args.repeats} timed runs. CPU timings compare these models with "
                      "each other; the fast-shape targets are GPU targets.")
    with tempfile.TemporaryDirectory(prefix="prunetune-speed-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        build_models(work, args, console)
        adapter = build_adapter(work, console)
        console.print(shapes_table(work))
        models = ("dense", *(p[0] for p in PRUNED))
        settings = SpeedSettings(models=models, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                                 warmup=args.warmup, repeats=args.repeats, dtype=args.dtype,
                                 lora=adapter.name)
        console.print(f"prunetune bench {' '.join(models)} --prompt-len {args.prompt_len} --decode-tokens "
                      f"{args.decode_tokens} --warmup-runs {args.warmup} --repeats {args.repeats} --dtype {args.dtype} "
                      f"--adapter {adapter.name}"
                      f"   (in {work})")
        here = os.getcwd()
        os.chdir(work)  # the table's labels are the directory names
        try:
            result = bench_speed(settings, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
        finally:
            os.chdir(here)
        console.print(result_table(result))
        for line in result_notes(result):
            console.print(line)
        found = checks(result)
        for name, ok, detail in found:
            verdict = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]", None: "-"}[ok]
            console.print(f"{verdict} {name}: {detail}")
        if args.json:
            from prunetune.report import provenance, write_json

            write_json(args.json, provenance("benchmarks/speed.py", layers=args.layers, **result.to_dict(),
                                             checks=[{"check": n, "passed": ok, "detail": d} for n, ok, d in found]))


if __name__ == "__main__":
    main()
