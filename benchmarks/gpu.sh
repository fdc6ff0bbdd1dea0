#!/usr/bin/env bash
# Every GPU measurement the docs still lack, in one command, into one JSON file. On one H100 or
# H200 it is sized to end inside 9 minutes (estimated from the CPU runs and the shapes; not yet run
# on a GPU):
#   1. the criterion benchmark at LLaMA-7B shape: vanilla Taylor, LoRA-guided, LoRA-guided on an 8-bit
#      base, each without and with gradient checkpointing (benchmarks/criterion.py);
#   2. `prunetune bench` on LLaMA-7B-shaped random models, dense and pruned 20% and 50%
#      (benchmarks/speed.py);
#   3. the memory planner against torch.cuda.max_memory_allocated for the cases of
#      benchmarks/plan_check.py;
#   4. LoRAPrune's steps per second at LLaMA-7B shape in bf16 (benchmarks/loraprune_steps.py).
#
#   bash benchmarks/gpu.sh [OUT.json]            # on the GPU machine, default benchmarks/results/gpu.json
#   GPU_SH_QUICK=1 bash benchmarks/gpu.sh OUT.json   # the same steps on tiny shapes (checks the script, CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu.json}
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ "${GPU_SH_QUICK:-0}" == 1 ]]; then
  CRITERION=(--shape tiny --seq-len 64 --repeats 1 --checkpointing both)
  SPEED=(--shape tiny --layers 2 --prompt-len 32 --decode-tokens 4 --warmup 0 --repeats 1)
  PLAN=(--quick --seq-len 32 --batch-sizes 1)
  STEPS=(--shape tiny --steps 3 --seq-len 64)
else
  CRITERION=(--shape llama-7b --seq-len 1024 --repeats 5 --checkpointing both)
  SPEED=()
  PLAN=()
  STEPS=(--shape llama-7b --steps 12 --seq-len 1024)
fi

"$PY" benchmarks/criterion.py "${CRITERION[@]}" --json "$WORK/criterion.json"
"$PY" benchmarks/speed.py "${SPEED[@]}" --work "$WORK/speed-models" --json "$WORK/speed.json"
rm -rf "$WORK/speed-models"
"$PY" benchmarks/plan_check.py "${PLAN[@]}" --json "$WORK/plan_check.json"
"$PY" benchmarks/loraprune_steps.py "${STEPS[@]}" --json "$WORK/loraprune_steps.json"

"$PY" - "$WORK" "$OUT" <<'PYTHON'
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
parts = {name: json.loads((work / f"{name}.json").read_text())
         for name in ("criterion", "speed", "plan_check", "loraprune_steps")}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(parts, indent=1))
print(f"wrote {out}")
PYTHON
