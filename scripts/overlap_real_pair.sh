#!/usr/bin/env bash
# Separate nodes, emulated: the receiver on CPU core 0 and the sharer on core 1 (taskset, one torch
# thread each), the real pair (SmolLM2-135M -> Gemma3-270M) with the shipped LCF adapter. For N
# held-out facts-same samples, the time to first token of an LCF handoff against the receiver
# alone reading the same context and prompt (NONE with the context as its own), measured in one
# run, interleaved; medians and the ratio in OUT/overlap.json.
#   bash scripts/overlap_real_pair.sh [N] [OUT]        defaults: 20, runs/overlap
# Extra sharer flags in SHARER_FLAGS (e.g. SHARER_FLAGS="--quantize none").
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
OUT=${2:-runs/overlap}
RECEIVER_PORT=${RECEIVER_PORT:-50192}
SHARER_PORT=${SHARER_PORT:-50193}
ADAPTER=adapters/smollm2-to-gemma3-lcf
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1

taskset -c 0 lcflow serve receiver --model gemma3-270m --adapter "$ADAPTER" --port "$RECEIVER_PORT" \
  > "$OUT/receiver.log" 2>&1 &
receiver=$!
taskset -c 1 lcflow serve sharer --model smollm2-135m-instruct --adapter "$ADAPTER" --port "$SHARER_PORT" \
  --receiver "127.0.0.1:$RECEIVER_PORT" ${SHARER_FLAGS:-} > "$OUT/sharer.log" 2>&1 &
sharer=$!
trap 'kill $sharer $receiver 2>/dev/null; wait 2>/dev/null' EXIT
python scripts/wait_serving.py "$RECEIVER_PORT" "$SHARER_PORT"

python - "$SHARER_PORT" "$N" "$OUT" <<'PY'
import json, statistics, sys

from lcflow.client import HandoffClient
from lcflow.tasks import get_task, question_prompt

port, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
samples = get_task("facts-same").samples("test", n, seed=0)
ttft = {"lcf": [], "none": []}
with HandoffClient(f"127.0.0.1:{port}", timeout_s=600) as client:
    for i, sample in enumerate([samples[0], *samples]):  # the first one warms both services up
        for mode in ("lcf", "none"):
            result = client.handoff(
                question_prompt(sample.question), mode=mode, context=sample.sharer_context,
                receiver_context=sample.sharer_context if mode == "none" else "", max_new_tokens=4,
            )
            if i > 0:
                ttft[mode].append(result.summary.timings.time_to_first_token)
report = {
    "n": n,
    "median_ttft_ms": {mode: statistics.median(values) for mode, values in ttft.items()},
    "ttft_ms": ttft,
}
report["lcf_over_receiver_alone"] = report["median_ttft_ms"]["lcf"] / report["median_ttft_ms"]["none"]
open(f"{out}/overlap.json", "w").write(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if k != "ttft_ms"}, indent=2))
PY
