"""Paired differences across two `lcflow eval` runs on the same samples: one method of the first
run (by default lcfx, an adapter under test) against every method of a base run, sample by sample
(greedy decoding makes each method's answers the same in every run, so two runs pair as one would).

    python scripts/pair_runs.py docs/results/general-adapter/facts-open-general.json \
        docs/results/channels-gemma3-to-gemma3-open.json
    python scripts/pair_runs.py --method forward+reader refined/results.json shipped/results.json
    python scripts/pair_runs.py a/results.json base-a/results.json --also b/results.json base-b/results.json \
        --json pooled.json      # two sample sets, one pooled difference

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
    parser.add_argument(
        "--also",
        nargs=2,
        action="append",
        default=[],
        metavar=("TESTED", "BASE"),
        type=Path,
        help="another pair of runs (other samples) pooled with the first: one difference over all "
        "their samples; repeatable",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows and the inputs here")
    args = parser.parse_args()
    records = []
    for index, (tested_path, base_path) in enumerate([(args.tested, args.base), *args.also]):
        records += run_records(tested_path, base_path, args.method, prefix=f"{index}:" if args.also else "")
    rows = paired_differences(records)
    for row in rows:
        scores = ", ".join(
            f"{score} {difference_cell(row, score)}"
            for score in ("em", "contains", "facts_stated")
            if difference_cell(row, score)
        )
        print(
            f"{args.method} minus {row['baseline']} (n={row['n']}): {scores}; "
            f"gained {row['gained']}, lost {row['lost']}"
        )
    if args.json:
        pairs = [[str(args.tested), str(args.base)], *[[str(t), str(b)] for t, b in args.also]]
        args.json.write_text(
            json.dumps({"method": args.method, "pairs": pairs, "rows": rows}, indent=2) + "\n"
        )


def run_records(tested_path: Path, base_path: Path, method: str, prefix: str = "") -> list[dict]:
    """The sample records of one pair of runs, the tested method named lcfx (paired_differences
    compares lcfx with every other method) and the base run's clashing names given "-base";
    sample ids prefixed so that pooled runs of other samples never pair with each other."""
    try:
        tested, base = json.loads(tested_path.read_text()), json.loads(base_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        sys.exit(f"pair_runs: cannot read a results.json: {err}")
    records = [
        {**r, "method": "lcfx", "sample_id": prefix + r["sample_id"]}
        for r in tested["samples"]
        if r["method"] == method
    ]
    if not records:
        sys.exit(f"pair_runs: {tested_path} has no {method} samples")
    for record in base["samples"]:
        clashes = record["method"] in ("lcfx", "lcfx-wrong", method)
        name = record["method"] + "-base" if clashes else record["method"]
        records.append({**record, "method": name, "sample_id": prefix + record["sample_id"]})
    return records


if __name__ == "__main__":
    main()
