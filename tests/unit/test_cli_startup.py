"""Fast start: `lcflow --help` and every sub-command's `--help` (bench's included) import neither
torch nor transformers, so the command line answers at once. Checked in a fresh interpreter,
since this test process has imported torch already (conftest). No timing is asserted here:
speed targets live in benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers")

# Builds the parser, walks it (sub-commands of sub-commands too) and asks each path for --help.
PROBE = f"""
import argparse, contextlib, io, json, sys

from lcflow import cli

def paths(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from paths(sub, (*prefix, name))

imported_by_build = [m for m in {HEAVY!r} if m in sys.modules]
codes = {{}}
for path in paths(cli.build_parser()):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main([*path, "--help"])
        except SystemExit as done:
            code = done.code
    codes[" ".join(path)] = code
print(json.dumps({{
    "imported_by_build": imported_by_build,
    "imported": [m for m in {HEAVY!r} if m in sys.modules],
    "codes": codes,
}}))
"""


def test_every_help_exits_0_without_torch_or_transformers():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    codes = report["codes"]
    # The walk found the top level, the sub-commands and bench's benchmarks.
    assert "" in codes and "eval" in codes and "bench" in codes
    assert any(path.startswith("bench ") for path in codes), codes
    assert {path: code for path, code in codes.items() if code != 0} == {}
    assert report["imported_by_build"] == [], "build_parser() imported them"
    assert report["imported"] == [], f"--help imported them, on one of: {sorted(codes)}"
