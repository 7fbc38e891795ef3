#!/usr/bin/env bash
# Rebuild the shipped adapters from scratch: train, prune, evaluate, write the model cards.
# One command, seeded. These are the settings the shipped adapters were built with; on the
# 2-core CPU development machine the runs took 13 min (LCF), 18 min (C2C) and 39 min (LCF-X).
#   bash scripts/build_adapters.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/build}
PAIR=smollm2-to-gemma3
S=smollm2-135m-instruct
R=gemma3-270m
A=adapters
export OMP_WAIT_POLICY=PASSIVE

lcflow models pull "$S"
lcflow models pull "$R"

# Same context: LCF (and a pruned copy) and the C2C baseline, same budget and learning rate.
lcflow train --sharer "$S" --receiver "$R" --mode lcf --task facts-same --steps 150 --batch-size 4 \
  --lr 1e-3 --gate-l1 0.02 --out "$RUNS/$PAIR-lcf"
lcflow train --sharer "$S" --receiver "$R" --mode c2c --task facts-same --layer-map last_aligned \
  --steps 150 --batch-size 4 --lr 1e-3 --out "$RUNS/$PAIR-c2c"
# Cross context: LCF-X on broad-word values (answers cannot be memorised), and a pruned copy.
lcflow train --sharer "$S" --receiver "$R" --mode lcfx --task facts-cross-words --steps 300 --batch-size 4 \
  --lr 1e-3 --gate-l1 0.02 --out "$RUNS/$PAIR-lcfx"

for m in lcf lcfx; do
  mkdir -p "$A/$PAIR-$m"
  cp "$RUNS/$PAIR-$m"/{adapter_config.json,encoder.safetensors,decoder.safetensors,train_log.json,loss_curve.png} "$A/$PAIR-$m/"
  lcflow prune "$A/$PAIR-$m" --min-gate 0.48 --out "$A/$PAIR-$m-pruned"
done
python - "$RUNS/$PAIR-c2c" "$A/$PAIR-c2c" <<'PY'
import sys, torch
from lcflow.adapter.c2c import C2CFuser
C2CFuser.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.bfloat16)
PY

lcflow eval --pair "$PAIR" --task facts-same --n 40 --methods receiver,text,lcf,c2c --out "$RUNS/eval-same"
lcflow eval --pair "$PAIR" --task facts-same --n 40 --methods lcf --adapter-lcf "$A/$PAIR-lcf-pruned" \
  --out "$RUNS/eval-same-pruned"
lcflow eval --pair "$PAIR" --task facts-cross --n 60 --methods receiver,skyline,text,lcfx,lcfx-pruned \
  --out "$RUNS/eval-cross"

card() { python -m lcflow.model_card "$A/$1" --eval "$RUNS/$2/results.json" --method "$3"; }
card "$PAIR-lcf" eval-same lcf
card "$PAIR-lcf-pruned" eval-same-pruned lcf
card "$PAIR-c2c" eval-same c2c
card "$PAIR-lcfx" eval-cross lcfx
card "$PAIR-lcfx-pruned" eval-cross lcfx-pruned
