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
