"""Task files: your own QA samples as JSONL, one JSON object per line.

    {"id": "q1", "sharer_context": "...", "receiver_context": "", "question": "...", "answers": ["Oslo"]}

Required: sharer_context (non-empty), receiver_context (may be ""), question (non-empty),
answers (a non-empty list of non-empty strings, the first canonical). Optional: id (default
"<file stem>-<line>"), task (default the file stem), same_context (default: whether the two
contexts are equal), open_ended (default false: true for an open prompt such as "Summarize what
you know about Ada", whose answers are then the facts a good answer states). Blank lines are skipped. Every bad line is reported, by line number, in
one error, so a file can be fixed in one pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from lcflow.tasks.base import QASample

REQUIRED_FIELDS = ("sharer_context", "receiver_context", "question", "answers")
OPTIONAL_FIELDS = ("id", "task", "same_context", "open_ended")
MAX_REPORTED_ERRORS = 20


def _problems(record: object) -> list[str]:
    """What is wrong with one parsed line (empty when it is a valid sample)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object, got {type(record).__name__}"]
    problems = [f"missing field {name!r}" for name in REQUIRED_FIELDS if name not in record]
    known = REQUIRED_FIELDS + OPTIONAL_FIELDS
    problems += [
        f"unknown field {name!r} (known: {', '.join(known)})" for name in record if name not in known
    ]
    for name in ("sharer_context", "receiver_context", "question", "id", "task"):
        if name in record and not isinstance(record[name], str):
            problems.append(f"{name!r} must be a string")
    for name in ("sharer_context", "question"):
        if isinstance(record.get(name), str) and not record[name].strip():
            problems.append(f"{name!r} is empty")
    answers = record.get("answers")
    if "answers" in record and (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        problems.append("'answers' must be a non-empty list of non-empty strings")
    for name in ("same_context", "open_ended"):
        if name in record and not isinstance(record[name], bool):
            problems.append(f"{name!r} must be true or false")
    return problems


def load_task_file(path: str | Path) -> list[QASample]:
    """Read and validate a JSONL task file; raises ValueError naming every bad line."""
    path = Path(path)
    samples: list[QASample] = []
    errors: list[str] = []
    seen_ids: dict[str, int] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"{path}:{line_number}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        problems = _problems(record)
        sample_id = record.get("id", f"{path.stem}-{line_number}") if isinstance(record, dict) else ""
        if not problems and sample_id in seen_ids:
            problems.append(f"duplicate id {sample_id!r} (first on line {seen_ids[sample_id]})")
        if problems:
            errors.append(f"{path}:{line_number}: " + "; ".join(problems))
            continue
        seen_ids[sample_id] = line_number
        samples.append(
            QASample(
                id=sample_id,
                sharer_context=record["sharer_context"],
                receiver_context=record["receiver_context"],
                question=record["question"],
                answers=list(record["answers"]),
                task=record.get("task", path.stem),
                same_context=record.get(
                    "same_context", record["receiver_context"] == record["sharer_context"]
                ),
                open_ended=record.get("open_ended", False),
            )
        )
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = len(errors) - len(shown)
        raise ValueError(
            f"{len(errors)} bad line(s) in task file {path}:\n"
            + "\n".join(shown)
            + (f"\n... and {more} more" if more else "")
        )
    if not samples:
        raise ValueError(f"task file {path} holds no samples")
    return samples


def save_task_file(samples: list[QASample], path: str | Path) -> Path:
    """Write samples as JSONL (all fields), e.g. to freeze a synthetic test set; load_task_file reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample.to_dict(), ensure_ascii=False) + "\n")
    return path
