"""What benchmarks/heldout.py measures: the domains, the rows and their arguments, the changes tried to
put LoRAPrune ahead, the one-shot candidates, and the plan of cells in the order they run.
Shared by the runner (heldout.py) and the page (heldout_tables.py)."""

from __future__ import annotations

DOMAINS = ("pydoc", "stdlib-code", "handbook")
HELD_OUT = ("stdlib-code", "handbook")  # the domains nothing was trained or calibrated on
RATIOS = (0.2, 0.5)
SEEDS = (0, 1, 2)

DEFAULT = "loraprune"
ROWS = {
    "loraprune": ("prunetune's default LoRAPrune", "--method loraprune --steps {steps}"),
    "loraprune-paper": ("LoRAPrune, the paper's recipe (heads-first split, per-module normalisation, no "
                        "distillation, the official code's schedule)",
                        "--method loraprune --steps {steps} --split heads-first --normalize module --no-distill "
                        "--prune-warmup 0.1 --prune-cooldown 0.1 --round-to 1"),
    "one-shot": ("prunetune's best one-shot configuration at this ratio (see the selection table), then the "
                 "recovery", None),
    "torch-pruning": ("Torch-Pruning, first-order Taylor on MLP channels, then the recovery", None),
    "dense-lora": ("the unpruned model after the recovery", None),
    "width": ("Taylor on heads and channels of every layer (uniform, cost split), then the recovery", None),
    "depth": ("whole layers by block influence (the nearest whole-layer count), then the recovery", None),
    "mix": ("heads, channels and layers, the depth/width split with the lowest calibration loss, then the "
            "recovery", None),
    "sheared": ("Sheared-LLaMA: `shear` to LoRAPrune's size with every head kept and the MLPs narrowed (the "
                "shape `make demo` shears to), then `train`; half the steps each, every weight trained (its "
                "learning rate, 1e-4), distilled from the source as the other rows", None),
}
# Sheared-LLaMA's row: the masks start from Taylor scores at the target, as `make demo`'s shear does;
# both runs (`shear`, then `train`) train every weight at its learning rate, distilled from the source.
SHEARED_TRAINING = "--distill --distill-alpha 0.5 --no-lora --lr 1e-4"
SHEAR = "--mask-init taylor --init-samples 16 --mask-lr 0.1 --lambda-lr 1.0 --lambda2-init 5000 --warmup-share 0"
# Depth against width: one-shot prunes of every layer cut to LoRAPrune's size, Taylor scoring the
# heads and channels, the same recovery. Whole layers cannot hit a size within 1% (a SmolLM2 layer is
# 2.6% of the model), so `depth` is the nearest whole-layer count and its size is in the table.
DEPTH_ROWS = {
    "width": "--method taylor --layers all --units heads,channels --allocation uniform --split cost --round-to 1",
    "depth": "--method taylor --layers all --units layers",
    "mix": "--method taylor --layers all --units heads,channels,layers --allocation uniform --split cost "
           "--round-to 1",
}
# Rows that turned out to be another row's model (heldout_tables.same_models finds them: they score
# the same to the digit): the cost split keeps every head, so `width` is first-order Taylor on the MLP
# channels of every layer, the Torch-Pruning peer's model; at 20% the mix removes no layer, so it is
# `width` too. Seed 0 (at 50%, seeds 0 and 1) ran and showed it: more seeds would repeat the peer's.
SAME_MODEL_AS = {(0.2, "width"): "torch-pruning", (0.2, "mix"): "torch-pruning", (0.5, "width"): "torch-pruning"}
BASELINES = ("one-shot", "torch-pruning")
SOURCE_HEADS = 9  # SmolLM2-135M's query heads per layer: a row that keeps them all cut only channels
# What was tried to put LoRAPrune ahead at 50%, where the one-shot row wins: a row with one change,
# one seed each (a change that wins becomes the default and gets the rows' three seeds). name -> (why,
# the row it changes, the arguments added to its `prune`, or for a baseline to its recovery's `train`).
SWEEP = {
    "rank-32": ("LoRA rank 32 (alpha 64): a rank-8 estimate sees the gradient through 8 input directions only",
                "loraprune", "--lora-r 32 --lora-alpha 64"),
    "one-shot-rank-32": ("the same rank for the baseline's recovery: what rank 32 gives any LoRA",
                         "one-shot", "--lora-r 32 --lora-alpha 64"),
    "cooldown-0.8": ("the target shape reached at step 20 instead of 50: 80 steps trained at the final shape",
                     "loraprune", "--prune-cooldown 0.8"),
    "distill-1": ("distillation only (alpha 1): nothing of the loss pulls towards the training text",
                  "loraprune", "--distill-alpha 1.0"),
    # On top of rank 32, the schedule of the scores: while B is zero the estimate sees the gradient only
    # through A's random input directions; as B trains it adds the output directions B has learnt.
    "rank-32-warmup-0.2": ("rank 32, pruning from step 20 instead of 5: the first scores come from an adapter "
                           "that has trained", "loraprune", "--lora-r 32 --lora-alpha 64 --prune-warmup 0.2"),
    "rank-32-ema-0.5": ("rank 32, the moving average at 0.5 instead of 0.9: later scores, from a trained B, "
                        "weigh more", "loraprune", "--lora-r 32 --lora-alpha 64 --ema 0.5"),
    # Which layers, and how the budget is shared by them: the best one-shot configuration at 20% ranks
    # units of every layer globally.
    "rank-32-global": ("rank 32, every layer with units ranked across layers (the one-shot row's choice at 20%), "
                       "at the same size", "loraprune", "--lora-r 32 --lora-alpha 64 --layers all --allocation global"),
    # Sheared-LLaMA with a LoRA (the masks learnt beside it in `shear`, then `train --lora`, merged when
    # saved) instead of every weight: trained on one domain, every weight moved towards it.
    "sheared-lora": ("Sheared-LLaMA training a LoRA at the adapter rate (5e-4) instead of every weight at 1e-4: "
                     "LoRA moves the model less towards the one domain it trains on", "sheared", "--lora --lr 5e-4"),
    # What costs Sheared-LLaMA at 50%. `width` is the sheared row's shape from a one-shot Taylor prune (the
    # masks `shear` starts from) with the recovery, so shape and learnt masks are measured apart; these
    # ask whether it is the steps trained under the masks' noise, by giving `shear` fewer of them.
    "sheared-lora-shear-10": ("Sheared-LLaMA with a LoRA, 10 steps of `shear` and 90 of `train`: fewer steps trained "
                              "under the masks' noise", "sheared", "--lora --lr 5e-4"),
    "sheared-shear-10": ("Sheared-LLaMA as the row, every weight trained, 10 steps of `shear` and 90 of `train`",
                         "sheared", ""),
    # The paper's score (the official code squares nothing: it takes the absolute value)
    "score-square": ("the paper's score, the squared estimate, instead of the official code's absolute value",
                     "loraprune", "--score square"),
    "prune-every-5": ("the masks updated every 5 steps instead of 10: each update removes half as much, and the "
                      "adapter has fewer units to make up for at once", "loraprune", "--prune-every 5"),
    # The target's own terms: `shear` to the shape LoRAPrune's default reaches (its first three layers
    # and the last whole, the others narrowed), a per-layer target, instead of a uniform one of its size.
    "sheared-lora-loraprune-shape": ("Sheared-LLaMA with a LoRA, 10 + 90 steps, at the very shape LoRAPrune's "
                                     "default reaches (a per-layer target) instead of every layer narrowed alike",
                                     "sheared", "--lora --lr 5e-4"),
    "sheared-loraprune-shape": ("Sheared-LLaMA as the row, every weight trained, 10 + 90 steps, at the very shape "
                                "LoRAPrune's default reaches", "sheared", ""),
}
# A sheared change's steps of `shear` (the rest go to `train`); half of them where not listed.
SHEAR_STEPS = {"sheared-lora-shear-10": 10, "sheared-shear-10": 10, "sheared-lora-loraprune-shape": 10,
               "sheared-loraprune-shape": 10}
# Sheared changes whose `shear` targets LoRAPrune's shape, not the uniform one of its size.
AT_LORAPRUNE_SHAPE = ("sheared-lora-loraprune-shape", "sheared-loraprune-shape")
SWEEP_RATIOS = (0.5, 0.2)
# The changes tried at a ratio; every one where not listed.
SWEEP_AT = {0.2: ("rank-32", "one-shot-rank-32", "rank-32-global")}
# Changes measured on three seeds: a target at that ratio is then checked for them too. Rank 32 for both
# rows, at 20% (where one seed put LoRAPrune ahead) and at 50% (what a new default rank needs: it is
# every method's adapter rank, so it must hold at both ratios).
SWEEP_SEEDS = {(r, name): SEEDS for r in RATIOS for name in ("rank-32", "one-shot-rank-32")}
# Sheared-LLaMA at LoRAPrune's very shape, with a LoRA and with every weight: one seed of each met the
# Sheared target, which then rests on them.
SWEEP_SEEDS |= {(0.5, name): SEEDS for name in ("sheared-lora-loraprune-shape", "sheared-loraprune-shape")}
SWEEP_PAIRS = {r: ("rank-32", "one-shot-rank-32") for r in RATIOS}  # (LoRAPrune's change, the baseline's)
# one-shot candidates: name -> `prunetune prune` arguments (--round-to 1: so every one reaches the size).
# The two criteria that score best after recovery in the quality benchmark, each on the layers LoRAPrune
# prunes with one ratio per layer, and on every layer with units ranked across layers. The cost split
# only: the allocation benchmark measured heads-first 2.9x worse at 20% before recovery.
SELECTION = {
    f"{criterion}/{layers}/{allocation}/cost": f"--method {criterion} --layers {layers} --allocation {allocation} "
                                               "--split cost --round-to 1"
    for criterion in ("taylor", "wanda-sp") for layers, allocation in (("paper", "uniform"), ("all", "global"))
}


def plan() -> list[tuple]:
    """(key, kind, ratio, name, seed, what it needs first) in the order they run: what the targets need first."""
    cells = [("dense", "dense", None, None, 0, [])]
    cells += [(f"{r}/{DEFAULT}/0", "row", r, DEFAULT, 0, []) for r in RATIOS]
    for r in RATIOS:
        cells += [(f"select/{r}/{name}", "select", r, name, 0, [f"{r}/{DEFAULT}/0"]) for name in SELECTION]
    for seed in SEEDS:
        for r in RATIOS:
            for row in (DEFAULT, *BASELINES):
                needs = [f"{r}/{DEFAULT}/0"] + ([f"select/{r}/{n}" for n in SELECTION] if row == "one-shot" else [])
                cells.append((f"{r}/{row}/{seed}", "row", r, row, seed, needs))
    cells += [(f"{r}/loraprune-paper/0", "row", r, "loraprune-paper", 0, [f"{r}/{DEFAULT}/0"]) for r in RATIOS]
    cells.append(("dense-lora/0", "row", None, "dense-lora", 0, []))
    cells += [(f"0.5/sheared/{seed}", "row", 0.5, "sheared", seed, ["0.5/" + DEFAULT + "/0"]) for seed in SEEDS]
    # depth against width: seed 0 first, then the others (the mix's lead rests on them)
    cells += [(f"{r}/{row}/{seed}", "row", r, row, seed, [f"{r}/{DEFAULT}/0"])
              for seed in SEEDS for r in RATIOS for row in DEPTH_ROWS
              if (r, row) not in SAME_MODEL_AS or seed == 0]
    cells += [(f"sweep/{r}/{name}/{seed}", "sweep", r, name, seed, [f"{r}/{DEFAULT}/0"]
               + ([f"select/{r}/{n}" for n in SELECTION] if SWEEP[name][1] == "one-shot" else []))
              for seed in SEEDS for r in SWEEP_RATIOS for name in SWEEP_AT.get(r, SWEEP)
              if seed in SWEEP_SEEDS.get((r, name), (0,))]
    seen, unique = set(), []
    for cell in cells:
        if cell[0] not in seen:
            seen.add(cell[0])
            unique.append(cell)
    return unique


def best_candidate(results: dict, ratio: float) -> str | None:
    scored = {c["candidate"]: c["perplexity"]["pydoc"]["perplexity"] for k, c in results["cells"].items()
              if k.startswith(f"select/{ratio}/") and c["candidate"] in SELECTION}
    return min(scored, key=scored.get) if len(scored) == len(SELECTION) else None
