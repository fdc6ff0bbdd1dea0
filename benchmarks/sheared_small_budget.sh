#!/usr/bin/env bash
# Sheared-LLaMA at the demo's budget (30 shear steps + 30 training steps, batch 2 x 128, lr 1e-4,
# every weight trained, two built-in domains with dynamic batch loading) on the real SmolLM2-135M:
# where the masks start, how they move and what the source teaches, one row per configuration.
#
#   bash benchmarks/sheared_small_budget.sh [OUT_DIR]     # about 6 minutes a row on 2 CPU cores
#
# Each row is `prunetune shear` then `prunetune train` on its result; the pydoc held-out perplexity
# (20 windows of 256 tokens) of both is printed at the end from the run directories' prunetune.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sheared-small-budget}
PT=${PRUNETUNE:-.venv/bin/prunetune}
COMMON=(--data code=builtin:stdlib-code,prose=builtin:pydoc --dynamic-loading --eval-every 5 --eval-blocks 4
        --eta 1.0 --clamp --steps 30 --batch-size 2 --grad-accum 1 --seq-len 128 --lr 1e-4 --warmup 0.05
        --no-lora --seed 0 --gradient-checkpointing --eval-data builtin:pydoc --eval-seq-len 256
        --max-windows 20 --overwrite)
SHAPE25=heads=6,kv-heads=3,intermediate=1152          # a quarter of the non-embedding parameters
SHAPE45=layers=24,heads=6,kv-heads=3,intermediate=1024  # the old demo's shape, 45% of them
SHAPE25MLP=intermediate=1024                            # the same parameters as SHAPE25, every head kept
PAPER=(--mask-init uniform --mask-lr 1.0 --warmup-share 0.2 --no-distill)

row() {  # NAME TARGET SHEAR_ARGS...
  local name=$1 target=$2; shift 2
  "$PT" shear smollm2-135m --target "$target" --lambda-lr 1.0 --lambda2-init 5000 "$@" "${COMMON[@]}" \
    --out "$OUT/$name-shear"
  local distill=(--no-distill)
  [[ " $* " == *" --no-distill "* ]] || distill=(--distill --distill-alpha 0.5)
  "$PT" train "$OUT/$name-shear" "${distill[@]}" "${COMMON[@]}" --out "$OUT/$name-train"
}

row paper-45 "$SHAPE45" "${PAPER[@]}"
row ranked-45 "$SHAPE45" --mask-init taylor --mask-lr 1.0 --warmup-share 0.2 --distill
row ranked-25 "$SHAPE25" --mask-init taylor --mask-lr 1.0 --warmup-share 0.2 --distill
row target-25-lr1 "$SHAPE25" --mask-init taylor --mask-lr 1.0 --warmup-share 0 --distill
row target-25 "$SHAPE25" --mask-init taylor --mask-lr 0.1 --warmup-share 0 --distill  # the defaults, the old demo
row target-25-mlp "$SHAPE25MLP" --mask-init taylor --mask-lr 0.1 --warmup-share 0 --distill  # the demo

for name in paper-45 ranked-45 ranked-25 target-25-lr1 target-25 target-25-mlp; do
  python3 - "$OUT/$name" <<'PY'
import json, sys
shear, train = (json.load(open(f"{sys.argv[1]}-{step}/prunetune.json")) for step in ("shear", "train"))
print(f"{sys.argv[1]}: {shear['parameters']['after']['total']:,} parameters; pydoc ppl "
      f"{shear['results']['perplexity_after']['perplexity']:.2f} after shear, "
      f"{train['results']['perplexity_after']['perplexity']:.2f} after train")
PY
done
