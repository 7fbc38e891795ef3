#!/usr/bin/env bash
# Record each shipped card's per-sample answers (model_card.json eval.answers) by re-running the
# card's own eval, for cards written before answers were recorded (new cards get them from
# lcflow.adapter.card --eval) or after a change of torch or CPU moves answers beyond the test's slack.
# tests/real_model/test_shipped_adapters.py replays the first samples of each and compares answers.
#
#   bash scripts/record_card_answers.sh                     every card without answers
#   bash scripts/record_card_answers.sh adapters/X ...      these adapters (re-recorded)
#
# The run must reproduce the card's EM (inside its 95% CI) or the answers are not written. One
# card takes 1-4 min on the 2-core development machine (the whole set ~30 min).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/card-answers}

if [[ $# -eq 0 ]]; then
  mapfile -t dirs < <(python - <<'EOF'
import json, pathlib
for path in sorted(pathlib.Path("adapters").glob("*/model_card.json")):
    if "answers" not in json.loads(path.read_text())["eval"]:
        print(path.parent)
EOF
  )
else
  dirs=("$@")
fi

for dir in "${dirs[@]}"; do
  name=$(basename "$dir")
  # the card's eval, as lcflow eval flags: method, then the rest
  read -r method flags < <(python - "$dir" <<'EOF'
import json, sys
card = json.load(open(f"{sys.argv[1]}/model_card.json"))
e = card["eval"]
print(e["method"], f"--sharer {card['sharer']} --receiver {card['receiver']} --task {e['task']} "
      f"--split {e['split']} --seed {e['seed']} --n {e['n']} --max-new-tokens {e['max_new_tokens']}")
EOF
  )
  echo "== $name ($method)"
  # shellcheck disable=SC2086  # $flags is a list of flags
  lcflow eval $flags --methods "$method" "--adapter-$method" "$dir" --out "$RUNS/$name"
  python -m lcflow.adapter.card "$dir" --method "$method" --answers-from "$RUNS/$name/results.json"
done
