#!/usr/bin/env bash
# Separate nodes, emulated: the receiver on CPU core 0 and the sharer on core 1 (taskset, one torch
# thread each). For N held-out samples, the time to first token of a handoff against the receiver
# alone with the same prompt, measured in one run, interleaved; medians and the ratio in
# OUT/overlap.json. Two modes (MODE):
#   lcf   (default) the real pair SmolLM2-135M -> Gemma3-270M with the shipped LCF adapter on
#         facts-same; the receiver alone reads the same context and prompt (NONE, the context as
#         its own), no session.
#   lcfx  Gemma3-270M -> Gemma3-270M with the shipped LCF-X adapter on facts-cross, the sharer's
#         context held in a session (opened before the clock starts, as an agent's usually is);
#         the receiver alone reads its own context and the prompt (NONE).
#   bash scripts/overlap_real_pair.sh [N] [OUT]        defaults: 20, runs/overlap
# Extra sharer flags in SHARER_FLAGS (e.g. SHARER_FLAGS="--quantize none").
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
OUT=${2:-runs/overlap}
MODE=${MODE:-lcf}
RECEIVER_PORT=${RECEIVER_PORT:-50192}
SHARER_PORT=${SHARER_PORT:-50193}
case "$MODE" in
  lcf) ADAPTER=adapters/smollm2-to-gemma3-lcf SHARER_MODEL=smollm2-135m-instruct ;;
  lcfx) ADAPTER=adapters/gemma3-to-gemma3-lcfx SHARER_MODEL=gemma3-270m ;;
  *) echo "MODE must be lcf or lcfx, not $MODE" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1

taskset -c 0 lcflow serve receiver --model gemma3-270m --adapter "$ADAPTER" --port "$RECEIVER_PORT" \
  > "$OUT/receiver.log" 2>&1 &
receiver=$!
taskset -c 1 lcflow serve sharer --model "$SHARER_MODEL" --adapter "$ADAPTER" --port "$SHARER_PORT" \
  --receiver "127.0.0.1:$RECEIVER_PORT" ${SHARER_FLAGS:-} > "$OUT/sharer.log" 2>&1 &
sharer=$!
trap 'kill $sharer $receiver 2>/dev/null; wait 2>/dev/null' EXIT
python scripts/wait_serving.py "$RECEIVER_PORT" "$SHARER_PORT"

python - "$SHARER_PORT" "$N" "$OUT" "$MODE" <<'PY'
import json, statistics, sys

from lcflow.client import HandoffClient
from lcflow.tasks import get_task, question_prompt

port, n, out, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
samples = get_task("facts-same" if mode == "lcf" else "facts-cross").samples("test", n, seed=0)
ttft = {mode: [], "none": []}
with HandoffClient(f"127.0.0.1:{port}", timeout_s=600) as client:
    for i, sample in enumerate([samples[0], *samples]):  # the first one warms both services up
        prompt = question_prompt(sample.question)
        if mode == "lcf":
            lcf = client.handoff(prompt, mode="lcf", context=sample.sharer_context, max_new_tokens=4)
            alone = client.handoff(
                prompt, mode="none", context=sample.sharer_context,
                receiver_context=sample.sharer_context, max_new_tokens=4,
            )
        else:
            with client.session(sample.sharer_context) as session_id:  # prefilled before the clock
                lcf = client.handoff(
                    prompt, mode="lcfx", session_id=session_id,
                    receiver_context=sample.receiver_context, max_new_tokens=4,
                )
            alone = client.handoff(
                prompt, mode="none", receiver_context=sample.receiver_context, max_new_tokens=4
            )
        if i > 0:
            ttft[mode].append(lcf.summary.timings.time_to_first_token)
            ttft["none"].append(alone.summary.timings.time_to_first_token)
report = {
    "mode": mode,
    "n": n,
    "median_ttft_ms": {m: statistics.median(values) for m, values in ttft.items()},
    "ttft_ms": ttft,
}
report[f"{mode}_over_receiver_alone"] = report["median_ttft_ms"][mode] / report["median_ttft_ms"]["none"]
open(f"{out}/overlap.json", "w").write(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if k != "ttft_ms"}, indent=2))
PY
