"""The examples run as written against both services (tiny models, a tiny LCF-X adapter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_adapter_dir
from service_helpers import running_services

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services(tiny_pair, tmp_path_factory):
    adapter_dir = tiny_adapter_dir(tiny_pair, tmp_path_factory.mktemp("adapter-lcfx"))
    with running_services(tiny_pair, adapter_dir) as running:
        yield running


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize(
    "mode, turns, variant",
    [("lcfx", 3, []), ("lcfx", 2, ["--async"]), ("text", 2, ["--async"])],
    ids=["lcfx-sync", "lcfx-async", "text-async"],
)
def test_two_agents_loop(services, mode, turns, variant):
    sessions_before = len(services.sharer_service.sessions)
    done = run_example(
        "two_agents.py",
        *("--sharer", services.sharer, "--turns", str(turns), "--mode", mode, "--max-new-tokens", "4"),
        *variant,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "planner: notes held in sharer session" in out and "planner: session closed" in out
    for turn in range(1, turns + 1):
        assert f"turn {turn}: " in out
    assert f"turn {turns + 1}: " not in out
    timings = [line for line in out.splitlines() if line.strip().startswith("first token")]
    assert len(timings) == turns
    if mode == "lcfx":  # every turn reuses the planner's session: nothing prefilled again
        assert all("sharer prefill 0 ms" in line for line in timings)
    assert len(services.sharer_service.sessions) == sessions_before  # closed at the end


def test_two_agents_reports_a_failed_handoff(services):
    sessions_before = len(services.sharer_service.sessions)
    done = run_example("two_agents.py", "--sharer", services.sharer, "--turns", "1", "--mode", "lcf")
    # the tiny services' adapter is LCF-X: an LCF handoff is refused with its status, no traceback
    assert done.returncode == 1 and "handoff failed: FAILED_PRECONDITION" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(services.sharer_service.sessions) == sessions_before  # the session closed on the error
