"""The README's Python example must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python example"
    code = (
        blocks[0]
        .replace('"/tmp/sharer"', repr(str(tmp_path / "s")))
        .replace('"/tmp/receiver"', repr(str(tmp_path / "r")))
    )
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # it printed the receiver's answer


def test_generated_tables_are_up_to_date():
    """docs/results.md, the README's result tables and adapters/README.md are rendered from their
    files (scripts/render_results.py); a results file or card changed without re-rendering fails."""
    import subprocess
    import sys

    script = README.parent / "scripts" / "render_results.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_the_readme_is_a_five_minute_read():
    assert len(README.read_text().splitlines()) <= 250


def test_the_unseen_family_is_re_scored_on_a_slice_of_its_samples():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "render_results", README.parent / "scripts" / "render_results.py"
    )
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    ems = {"lcfx": [1, 1, 0, 1], "forward": [0, 1, 0, 0]}
    records = [
        {"method": m, "sample_id": f"s{i}", "em": em, "contains": em, "f1": em}
        for i in range(4)
        for m, values in ems.items()
        for em in [values[i]]
    ]
    latency = {"total": {"median": 9.0, "p90": 9.0}}
    summary = [
        {
            "method": m,
            "n": 4,
            "em": 0.0,
            "em_ci": [0, 0],
            "f1": 0.0,
            "bytes_sent_median": 9,
            "latency_ms": latency,
        }
        for m in ems
    ]
    results = {"samples": records, "summary": summary, "meta": {"split": "file", "n": 4}}
    again = render.rescored(results, 1, 3)  # samples s1 and s2
    rows = {row["method"]: row for row in again["summary"]}
    assert (rows["lcfx"]["n"], rows["lcfx"]["em"], rows["forward"]["em"]) == (2, 0.5, 0.5)
    assert again["meta"]["n"] == 2 and "samples 1-2" in again["meta"]["split"]
    assert [(p["method"], p["baseline"], p["em_difference"]) for p in again["paired"]] == [
        ("lcfx", "forward", 0.0)
    ]
    assert "| LCF-X's sentences" not in render.channel_table(again)  # only the methods that ran
