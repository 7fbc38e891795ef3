#!/usr/bin/env bash
# One sharer and one receiver process for the real pair (SmolLM2-135M -> Gemma3-270M), both started
# with --adapters adapters/ and no default adapter, serve every mode chosen per request: N held-out
# samples each of LCF, C2C, TEXT and NONE on facts-same and of LCF-X, TEXT and NONE on facts-cross,
# scored by exact match; one JSON record per handoff in OUT/handoffs.jsonl, a table in OUT/table.md.
# TEXT runs on the first N_TEXT samples only (default 3): on this CPU the sharer writes its note
# for ~30 s, and its accuracy is measured in-process on hundreds (docs/results).
#   bash scripts/every_mode_real_pair.sh [N] [OUT]        defaults: 20, runs/every-mode
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
OUT=${2:-runs/every-mode}
RECEIVER_PORT=${RECEIVER_PORT:-50190}
SHARER_PORT=${SHARER_PORT:-50191}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE

lcflow serve receiver --model gemma3-270m --adapters adapters --port "$RECEIVER_PORT" > "$OUT/receiver.log" 2>&1 &
receiver=$!
lcflow serve sharer --model smollm2-135m-instruct --adapters adapters --port "$SHARER_PORT" \
  --receiver "127.0.0.1:$RECEIVER_PORT" > "$OUT/sharer.log" 2>&1 &
sharer=$!
trap 'kill $sharer $receiver 2>/dev/null; wait 2>/dev/null' EXIT

python scripts/wait_serving.py "$RECEIVER_PORT" "$SHARER_PORT"  # start-up is not measured
python - "$RECEIVER_PORT" "$SHARER_PORT" "$N" "$OUT" "${N_TEXT:-3}" <<'PY'
import json, sys

from lcflow.client import HandoffClient
from lcflow.eval.metrics import exact_match, extract_answer
from lcflow.tasks import get_task, question_prompt

receiver_port, sharer_port, n, out, n_text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
plan = {"facts-same": ("lcf", "c2c", "text", "none"), "facts-cross": ("lcfx", "text", "none")}
records = []
with HandoffClient(f"127.0.0.1:{sharer_port}", timeout_s=600) as client, open(f"{out}/handoffs.jsonl", "w") as f:
    for task, modes in plan.items():
        samples = get_task(task).samples("test", n, seed=0)
        for mode in modes:
            for sample in samples[:n_text] if mode == "text" else samples:
                result = client.handoff(
                    question_prompt(sample.question), mode=mode, context=sample.sharer_context,
                    receiver_context=sample.receiver_context, max_new_tokens=24,
                )  # as `lcflow demo` asks and scores
                s = result.summary
                answer = extract_answer(s.answer)
                record = {
                    "task": task, "mode": mode, "adapter": s.adapter, "answer": answer,
                    "expected": sample.answers[0], "em": exact_match(answer, sample.answers),
                    "ttft_ms": s.timings.time_to_first_token, "bytes_wire": s.bytes_wire,
                }
                records.append(record)
                f.write(json.dumps(record) + "\n")
            done = [r for r in records if r["task"] == task and r["mode"] == mode]
            print(f"{task:12s} {mode:5s} adapter {done[0]['adapter'] or '-':32s} "
                  f"EM {sum(r['em'] for r in done) / len(done):.3f} (n={len(done)})", flush=True)

lines = ["| task | mode | adapter | EM | n | median TTFT ms | median wire bytes |", "|---|---|---|---|---|---|---|"]
for task, modes in plan.items():
    for mode in modes:
        done = [r for r in records if r["task"] == task and r["mode"] == mode]
        ttft = sorted(r["ttft_ms"] for r in done)[len(done) // 2]
        wire = sorted(r["bytes_wire"] for r in done)[len(done) // 2]
        em = sum(r["em"] for r in done) / len(done)
        lines.append(f"| {task} | {mode} | {done[0]['adapter'] or '-'} | {em:.3f} | {len(done)} | {ttft:.0f} | {wire} |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
