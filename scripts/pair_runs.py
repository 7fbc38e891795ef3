"""Paired differences across two `lcflow eval` runs on the same samples: one method of the first
run (by default lcfx, an adapter under test) against every method of a base run, sample by sample
(greedy decoding makes each method's answers the same in every run, so two runs pair as one would).

    python scripts/pair_runs.py docs/results/general-adapter/facts-open-general.json \
        docs/results/channels-gemma3-to-gemma3-open.json
    python scripts/pair_runs.py --method forward+reader refined/results.json shipped/results.json

The base run's own rows of the tested method, lcfx and lcfx-wrong appear with "-base" added
(lcfx-base, forward+reader-base). Prints one line per base method: n, the EM, contains and (open
prompts) facts-stated differences with 95% CIs, and how many samples the tested method gained and
lost in EM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcflow.eval.report import difference_cell, paired_differences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tested", type=Path, help="results.json holding the method under test")
    parser.add_argument("base", type=Path, help="results.json of the methods to compare it with")
    parser.add_argument("--method", default="lcfx", help="the first run's method under test")
    args = parser.parse_args()
    try:
        tested, base = json.loads(args.tested.read_text()), json.loads(args.base.read_text())
    except (OSError, json.JSONDecodeError) as err:
        sys.exit(f"pair_runs: cannot read a results.json: {err}")
    # paired_differences compares lcfx with every other method: the method under test takes its name.
    records = [{**r, "method": "lcfx"} for r in tested["samples"] if r["method"] == args.method]
    if not records:
        sys.exit(f"pair_runs: {args.tested} has no {args.method} samples")
    for record in base["samples"]:
        clashes = record["method"] in ("lcfx", "lcfx-wrong", args.method)
        records.append({**record, "method": record["method"] + "-base" if clashes else record["method"]})
    for row in paired_differences(records):
        scores = ", ".join(
            f"{score} {difference_cell(row, score)}"
            for score in ("em", "contains", "facts_stated")
            if difference_cell(row, score)
        )
        print(
            f"{args.method} minus {row['baseline']} (n={row['n']}): {scores}; "
            f"gained {row['gained']}, lost {row['lost']}"
        )


if __name__ == "__main__":
    main()
