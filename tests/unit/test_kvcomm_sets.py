"""The KVComm sets (lcflow/data/tasks/kvcomm): the converter keeps each record's facts, and the
shipped files are the task files it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lcflow.tasks import load_task_file

KVCOMM = Path(__file__).resolve().parents[2] / "lcflow" / "data" / "tasks" / "kvcomm"


def load_converter():
    spec = importlib.util.spec_from_file_location("kvcomm_convert", KVCOMM / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_converter_writes_task_files_from_kvcomms_records(tmp_path):
    data = tmp_path / "src" / "dataloader" / "data"
    data.mkdir(parents=True)
    country = {
        "id": "countries_0007",
        "person": "Uma",
        "landmark": "Mahaffie House",
        "country": "United States",
    }
    country |= {"prompt_A": "Uma is at the Mahaffie House.", "prompt_B": "Which country is Uma located in?"}
    tip = {"prompt_A": "A LLC is up. B LLC is down.", "label": "A LLC", "options": ["A LLC", "B LLC"]}
    tip["prompt_B"] = (
        "Pick one of A LLC, B LLC. You must only answer with the company name.\nThe company name is:"
    )
    (data / "countries.jsonl").write_text(json.dumps(country) + "\n")
    (data / "tipsheets.jsonl").write_text(json.dumps(tip) + "\n")
    assert load_converter().convert(tmp_path / "src", tmp_path) == {"countries": 1, "tipsheets": 1}
    [c] = load_task_file(tmp_path / "countries.jsonl")
    assert (c.id, c.sharer_context, c.question, c.answers) == (
        "countries/countries_0007", "Uma is at the Mahaffie House.", "Which country is Uma located in?",
        ["United States"],
    )  # fmt: skip
    assert "extrapolate the country" in c.receiver_context and not c.same_context
    [t] = load_task_file(tmp_path / "tipsheets.jsonl")
    assert t.question == "Pick one of A LLC, B LLC. You must only answer with the company name."
    assert t.answers == ["A LLC"] and t.receiver_context == "" and t.task == "tipsheets"


def test_the_shipped_sets_load_with_their_licence():
    assert len(load_task_file(KVCOMM / "countries.jsonl")) == 200
    tips = load_task_file(KVCOMM / "tipsheets.jsonl")
    assert len(tips) == 500 and all(t.answers[0] in t.sharer_context for t in tips)
    assert "Apache License" in (KVCOMM / "LICENSE").read_text()
