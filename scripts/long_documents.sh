#!/usr/bin/env bash
# Long documents (facts-cross-longer, about 2,500 tokens): the shipped Gemma3 LCF-X adapter read
# with chunked selection and a larger budget, no weights changed (docs/measurements.md, "Long
# documents"; files in docs/results/long-documents/).
#
#   bash scripts/long_documents.sh            # the copy, a dev check on the train split, the test run
#   CHUNK=128 SLOTS=64 bash scripts/long_documents.sh
#   bash scripts/long_documents.sh channels   # every other channel beside the shipped lcfx-long
#
# The copy differs from adapters/gemma3-to-gemma3-lcfx in two fields of adapter_config.json:
# `slots` (positions per layer) and `selection_chunk` (the question's attention normalised over
# one chunk of that many positions at a time, lcflow.packets.selection). Both were chosen on the
# family's train split (`python -m lcflow.research.long_selection`, then the dev run below); the
# test split is only measured.
set -euo pipefail
cd "$(dirname "$0")/.."
SLOTS=${SLOTS:-128}
CHUNK=${CHUNK:-128}
RUNS=${RUNS:-runs/long-documents}
ADAPTER=$RUNS/gemma3-to-gemma3-lcfx-c$CHUNK-m$SLOTS

mkdir -p "$RUNS"

if [ "${1:-}" = channels ]; then
  # Every other channel on the same test documents, in one run: forward-selected sends what
  # gemma3-to-gemma3-lcfx-long selects; the +reader method reads it with the shipped reader.
  lcflow eval --pair gemma3-to-gemma3 --task facts-cross-longer --split test --n 100 \
    --methods receiver,forward,forward-selected,forward-selected+reader,kvcomm,lcfx-wrong,text --text-batch 8 \
    --adapter-lcfx adapters/gemma3-to-gemma3-lcfx-long --out "$RUNS/channels"
  python scripts/pair_runs.py docs/results/long-documents/lcfx-long-test.json "$RUNS/channels/results.json"
  exit 0
fi
python scripts/adapter_copy.py adapters/gemma3-to-gemma3-lcfx "$ADAPTER" --set slots="$SLOTS" --set selection_chunk="$CHUNK"

# Dev check on the family's train split (the adapter never trained on facts-cross-longer).
lcflow eval --pair gemma3-to-gemma3 --task facts-cross-longer --split train --n 30 --methods lcfx \
  --adapter-lcfx "$ADAPTER" --out "$RUNS/dev-c$CHUNK-m$SLOTS"
# The held-out measurement, paired with the document reader's run on the same samples.
lcflow eval --pair gemma3-to-gemma3 --task facts-cross-longer --split test --n 100 --methods lcfx \
  --adapter-lcfx "$ADAPTER" --out "$RUNS/test-c$CHUNK-m$SLOTS"
python scripts/pair_runs.py "$RUNS/test-c$CHUNK-m$SLOTS/results.json" \
  docs/results/channels-gemma3-to-gemma3-longer.json
