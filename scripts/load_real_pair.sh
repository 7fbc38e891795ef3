#!/usr/bin/env bash
# The real pair under load: Gemma3-270M on both sides with the shipped span-packet LCF-X adapter,
# both services on this machine, `lcflow bench load` against them with their RSS sampled.
#   bash scripts/load_real_pair.sh [REQUESTS] [CONCURRENCY] [OUT]
# Defaults: 400 handoffs at concurrency 4 into runs/load-real. Extra service flags can be given
# in SERVE_FLAGS (e.g. SERVE_FLAGS="--max-concurrent 2").
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${1:-400}
CONCURRENCY=${2:-4}
OUT=${3:-runs/load-real}
MODEL=gemma3-270m
ADAPTER=adapters/gemma3-to-gemma3-lcfx
RECEIVER_PORT=${RECEIVER_PORT:-50180}
SHARER_PORT=${SHARER_PORT:-50181}
mkdir -p "$OUT"

lcflow serve receiver --model "$MODEL" --adapter "$ADAPTER" --port "$RECEIVER_PORT" ${SERVE_FLAGS:-} \
  > "$OUT/receiver.log" 2>&1 &
receiver=$!
lcflow serve sharer --model "$MODEL" --adapter "$ADAPTER" --port "$SHARER_PORT" \
  --receiver "127.0.0.1:$RECEIVER_PORT" ${SERVE_FLAGS:-} > "$OUT/sharer.log" 2>&1 &
sharer=$!
trap 'kill $sharer $receiver 2>/dev/null; wait 2>/dev/null' EXIT

# Both SERVING (grpc.health.v1) before the first handoff, so start-up is not counted as load.
python scripts/wait_serving.py "$RECEIVER_PORT" "$SHARER_PORT"

lcflow bench load --sharer "127.0.0.1:$SHARER_PORT" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
  --mode lcfx --sharer-pid "$sharer" --receiver-pid "$receiver" --out "$OUT"
