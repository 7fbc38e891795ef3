"""Convert KVComm's Countries and TipSheets sets (github.com/Zephyroam/KVComm, Apache-2.0) into
lcflow task files, the JSONL `lcflow eval --task-file` reads.

    python lcflow/data/tasks/kvcomm/convert.py KVCOMM_CHECKOUT [--out lcflow/data/tasks/kvcomm]

Countries: the sharer knows where a person is ("Uma is at the Mahaffie House."); the receiver is
asked the country ("Which country is Uma located in?"). KVComm appends "You are required to
extrapolate the country from the context." to the receiver's prompt; that sentence is kept as
the receiver's context, so the receiver knows the answer is to be inferred from what it is told.
TipSheets: the sharer reads three companies' tip sheets; the receiver must pick one to invest in.
The prompt's trailing cue ("\\nThe company name is:") is dropped: lcflow renders the question in
each model's own template. The answer is KVComm's label (the company whose tips are positive).
Nothing else is changed; ids keep KVComm's (Countries) or its line number (TipSheets).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COUNTRIES_CUE = "You are required to extrapolate the country from the context."
TIPSHEETS_CUE = "\nThe company name is:"


def countries(record: dict) -> dict:
    return {
        "id": f"countries/{record['id']}",
        "sharer_context": record["prompt_A"],
        "receiver_context": COUNTRIES_CUE,
        "question": record["prompt_B"],
        "answers": [record["country"]],
        "task": "countries",
    }


def tipsheets(record: dict, line: int) -> dict:
    question = record["prompt_B"]
    if question.endswith(TIPSHEETS_CUE):
        question = question[: -len(TIPSHEETS_CUE)]
    return {
        "id": f"tipsheets/{line}",
        "sharer_context": record["prompt_A"],
        "receiver_context": "",
        "question": question.strip(),
        "answers": [record["label"]],
        "task": "tipsheets",
    }


def convert(source: Path, out: Path) -> dict[str, int]:
    data = source / "dataloader" / "data"
    written = {}
    for name, make in (("countries", lambda r, _: countries(r)), ("tipsheets", tipsheets)):
        lines = (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [make(json.loads(line), i) for i, line in enumerate(lines) if line.strip()]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written[name] = len(records)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a checkout of github.com/Zephyroam/KVComm")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="where the task files go")
    args = parser.parse_args()
    for name, count in convert(args.source, args.out).items():
        print(f"wrote {args.out / name}.jsonl: {count} samples")


if __name__ == "__main__":
    main()
