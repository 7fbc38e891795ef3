#!/usr/bin/env bash
# The channel comparison (docs/results/channels-*.json, rendered into docs/results.md and the
# README by scripts/render_results.py): LCF-X beside every text channel, on the same samples, in
# one run per pair and task. Needs the text readers (adapters/<pair>-reader-*), made with:
#
#   lcflow train --sharer gemma3-270m --receiver gemma3-270m --mode text-reader \
#     --channel forward-selected --init-adapter adapters/gemma3-to-gemma3-lcfx \
#     --task facts-cross-words --steps 120 --batch-size 16 --lr 3e-4 --kl-weight 0.25 \
#     --checkpoint-every 10 --out adapters/gemma3-to-gemma3-reader-selected
#
# (the LCF-X adapter's own recipe: its model card's `training`, with the text reader's channel).
#
#   bash scripts/channels.sh                 # both tasks for Gemma3 -> Gemma3
#   PAIR=smollm2-to-gemma3 bash scripts/channels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR=${PAIR:-gemma3-to-gemma3}
N=${N:-200}
RUNS=${RUNS:-runs/channels}
METHODS=${METHODS:-receiver,forward,text,forward-selected,forward-selected+reader,forward+reader,lcfx,lcfx-wrong}

run() {  # run NAME TASK-ARGUMENTS...: one torch thread, as the recorded runs (two at once on 2 cores)
  local name=$1
  shift
  OMP_NUM_THREADS=${THREADS:-1} lcflow eval --pair "$PAIR" "$@" --n "$N" --methods "$METHODS" \
    --out "$RUNS/$PAIR-$name" > "$RUNS/$PAIR-$name.log" 2>&1
  cp "$RUNS/$PAIR-$name/results.json" "docs/results/channels-$PAIR-$name.json"
}

mkdir -p "$RUNS"
run facts-cross --task facts-cross --split test &
# The unseen family: no adapter, reader or design choice trained on it.
run ships --task-file lcflow/data/tasks/ships-cross.jsonl &
wait
python scripts/render_results.py
