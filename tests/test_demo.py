"""`lcflow demo` end to end with tiny models: two real service processes, TEXT vs LCF-X."""

import subprocess
import sys

import pytest
import torch
from helpers import check_demo_output

from lcflow import demo
from lcflow.adapter import LatentAdapter
from lcflow.kv import model_identity
from lcflow.tiny import load_tiny


@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir, tmp_path_factory):
    sharer_dir, receiver_dir = tiny_dir("llama", 300, 3), tiny_dir("gemma3", 400, 2)
    s, r = load_tiny(sharer_dir), load_tiny(receiver_dir)
    adapter = LatentAdapter.for_models("lcfx", model_identity(*s), model_identity(*r), bottleneck=16, slots=4)
    torch.nn.init.normal_(next(p for n, p in adapter.named_parameters() if n.endswith("up.weight")), std=0.3)
    return sharer_dir, receiver_dir, adapter.save_pretrained(tmp_path_factory.mktemp("demo-adapter"))


def test_demo_runs_both_services_and_compares_text_with_lcfx(tiny_adapter, tmp_path):
    sharer_dir, receiver_dir, adapter_dir = tiny_adapter
    command = [sys.executable, "-m", "lcflow.cli", "demo", "--sharer-model", str(sharer_dir)]
    command += ["--receiver-model", str(receiver_dir), "--adapter", str(adapter_dir), "--n", "2"]
    command += ["--max-new-tokens", "3", "--run-dir", str(tmp_path / "run"), "--startup-timeout-s", "120"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "both services are SERVING" in out
    check_demo_output(out, questions=2)
    assert "stopped both services" in out
    logs = {p.name for p in (tmp_path / "run").iterdir()}
    assert logs == {"sharer.log", "receiver.log"}
    assert '"trace_id"' in (tmp_path / "run" / "sharer.log").read_text()  # console exporter's spans


def test_missing_shipped_adapter_falls_back_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "other-lcfx").mkdir()
    (tmp_path / "other-lcfx" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(demo, "REPO_ADAPTERS", tmp_path)
    said = []
    assert demo.find_adapter("", said.append) == tmp_path / "other-lcfx"
    assert "not there" in said[0]
    (tmp_path / "other-lcfx" / "adapter_config.json").unlink()
    with pytest.raises(SystemExit, match="lcflow train"):
        demo.find_adapter("", said.append)
