"""scripts/pair_runs.py: one run's method against every method of another run, sample by sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pair_runs.py"


def results(path: Path, ems: dict[str, list[float]]) -> Path:
    """A results.json with per-sample EM (and contains equal to it) for each method."""
    samples = [
        {"method": method, "sample_id": f"s{i}", "em": em, "contains": em}
        for method, values in ems.items()
        for i, em in enumerate(values)
    ]
    path.write_text(json.dumps({"samples": samples}))
    return path


def pair(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True)


def test_lcfx_is_paired_with_every_base_method_and_the_base_lcfx_is_renamed(tmp_path):
    tested = results(tmp_path / "a.json", {"lcfx": [1, 1, 0, 1]})
    base = results(tmp_path / "b.json", {"forward": [0, 1, 0, 0], "lcfx": [1, 1, 1, 1]})
    out = pair(tested, base)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "lcfx minus forward (n=4): em +0.500 [-0.066, +1.000], contains +0.500 [-0.066, +1.000]; gained 2, lost 0",
        "lcfx minus lcfx-base (n=4): em -0.250 [-0.740, +0.240], contains -0.250 [-0.740, +0.240]; gained 0, lost 1",
    ]


def test_another_method_can_be_tested_and_a_missing_one_is_named(tmp_path):
    tested = results(tmp_path / "a.json", {"forward+reader": [1, 1, 1, 0]})
    base = results(tmp_path / "b.json", {"forward+reader": [1, 0, 0, 0]})
    out = pair("--method", "forward+reader", tested, base)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("forward+reader minus forward+reader-base (n=4): em +0.500")
    assert "gained 2, lost 0" in out.stdout
    missing = pair("--method", "kvcomm", tested, base)
    assert missing.returncode != 0 and "has no kvcomm samples" in missing.stderr


def test_an_unreadable_file_is_one_line(tmp_path):
    tested = results(tmp_path / "a.json", {"lcfx": [1, 0]})
    out = pair(tested, tmp_path / "missing.json")
    assert (
        out.returncode != 0 and "cannot read a results.json" in out.stderr and "Traceback" not in out.stderr
    )


def test_runs_of_other_samples_pool_into_one_difference_and_never_pair_across(tmp_path):
    """Two sample sets whose ids coincide (s0, s1): pooled, each tested sample pairs with its own
    set's base only, n is the sum, and --json keeps the inputs beside the rows."""
    first = results(tmp_path / "a.json", {"lcfx": [1, 1]}), results(tmp_path / "b.json", {"lcfx": [0, 1]})
    second = results(tmp_path / "c.json", {"lcfx": [0, 0]}), results(tmp_path / "d.json", {"lcfx": [0, 1]})
    out = pair(*first, "--also", *second, "--json", tmp_path / "pooled.json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lcfx minus lcfx-base (n=4): em +0.000") and "gained 1, lost 1" in out.stdout
    written = json.loads((tmp_path / "pooled.json").read_text())
    assert written["pairs"][1] == [str(second[0]), str(second[1])] and written["rows"][0]["n"] == 4
