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
#   bash scripts/channels.sh                 # facts-cross and ships for Gemma3 -> Gemma3
#   PAIR=smollm2-to-gemma3 bash scripts/channels.sh
#   TASKS="referents ships-referents" bash scripts/channels.sh   # any names of task_arguments below
#   TASKS="countries tipsheets" bash scripts/channels.sh         # the peer benchmarks
#
# Tasks run two at a time (one torch thread each: 2 cores). kvcomm runs on same-model pairs only
# (`lcflow eval` skips it on the others, saying why).
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR=${PAIR:-gemma3-to-gemma3}
N=${N:-200}
RUNS=${RUNS:-runs/channels}
TASKS=${TASKS:-facts-cross ships}
METHODS=${METHODS:-receiver,forward,text,forward-selected,forward-selected+reader,forward+reader,kvcomm,lcfx,lcfx-wrong}

task_arguments() {  # a short name -> its `lcflow eval` sample flags
  case $1 in
    facts-cross) echo --task facts-cross --split test ;;
    referents) echo --task facts-referents --split test ;;
    inside-hops) echo --task facts-inside-hops --split test ;;
    longer) echo --task facts-cross-longer --split test ;;
    # The unseen families: no adapter, reader or design choice trained on them.
    ships) echo --task-file lcflow/data/tasks/ships-cross.jsonl ;;
    ships-referents | ships-inside-hops) echo --task-file "lcflow/data/tasks/$1.jsonl" ;;
    # The public peer benchmarks (KVComm's Countries and TipSheets; never trained on).
    countries | tipsheets) echo --task-file "lcflow/data/tasks/kvcomm/$1.jsonl" ;;
    *) echo "unknown task name $1" >&2 && exit 2 ;;
  esac
}

run() {  # run NAME: one torch thread, as the recorded runs; this checkout's code (python -m)
  local name=$1 arguments
  arguments=$(task_arguments "$name")
  # shellcheck disable=SC2086 # the flags are words
  OMP_NUM_THREADS=${THREADS:-1} python -m lcflow.cli eval --pair "$PAIR" $arguments --n "$N" --methods "$METHODS" \
    --out "$RUNS/$PAIR-$name" > "$RUNS/$PAIR-$name.log" 2>&1
  cp "$RUNS/$PAIR-$name/results.json" "docs/results/channels-$PAIR-$name.json"
}

mkdir -p "$RUNS"
set -- $TASKS
while [ $# -gt 0 ]; do  # two at a time; a failed run stops the script (set -e, at its wait)
  pids=()
  for name in "${@:1:2}"; do
    run "$name" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  shift $(( $# > 1 ? 2 : 1 ))
done
python scripts/render_results.py
