"""The README's Python example must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


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
