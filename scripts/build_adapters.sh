#!/usr/bin/env bash
# Rebuild the shipped adapters from scratch: train, prune, evaluate, write the model cards.
# One command, seeded; on the 2-core CPU development machine each training run took ~30-40 min.
#   bash scripts/build_adapters.sh            (STEPS=300 N=100 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
N=${N:-100}
RUNS=${RUNS:-runs/build}
PAIR=smollm2-to-gemma3
S=smollm2-135m-instruct
R=gemma3-270m
export OMP_WAIT_POLICY=PASSIVE

lcflow models pull "$S"
lcflow models pull "$R"

# Cross context: LCF-X, and its pruned copy.
lcflow train --sharer "$S" --receiver "$R" --mode lcfx --task facts-cross --steps "$STEPS" --batch-size 4 \
  --lr 1e-3 --gate-l1 0.02 --out "adapters/$PAIR-lcfx"
rm -rf "adapters/$PAIR-lcfx/checkpoint"
lcflow prune "adapters/$PAIR-lcfx" --min-gate 0.05 --out "adapters/$PAIR-lcfx-pruned"

# Same context: LCF and the C2C baseline.
lcflow train --sharer "$S" --receiver "$R" --mode lcf --task facts-same --steps "$STEPS" --batch-size 4 \
  --lr 1e-3 --gate-l1 0.02 --out "adapters/$PAIR-lcf"
rm -rf "adapters/$PAIR-lcf/checkpoint"
lcflow train --sharer "$S" --receiver "$R" --mode c2c --task facts-same --steps "$STEPS" --batch-size 4 \
  --lr 1e-4 --out "$RUNS/$PAIR-c2c"

lcflow eval --pair "$PAIR" --task facts-cross --n "$N" --methods receiver,skyline,text,lcfx,lcfx-pruned \
  --out "$RUNS/eval-cross"
lcflow eval --pair "$PAIR" --task facts-same --n "$N" --methods receiver,text,lcf,c2c \
  --adapter-c2c "$RUNS/$PAIR-c2c" --out "$RUNS/eval-same"

python -m lcflow.model_card "adapters/$PAIR-lcfx" --eval "$RUNS/eval-cross/results.json" --method lcfx
python -m lcflow.model_card "adapters/$PAIR-lcfx-pruned" --eval "$RUNS/eval-cross/results.json" --method lcfx-pruned
python -m lcflow.model_card "adapters/$PAIR-lcf" --eval "$RUNS/eval-same/results.json" --method lcf
