"""`lcflow demo` end to end with tiny models: two real service processes, every text channel beside LCF-X."""

import shutil
import subprocess
import sys

import pytest
import torch
from service_helpers import check_demo_output

from lcflow import demo
from lcflow.adapter import LatentAdapter
from lcflow.adapter.reader import TextReader
from lcflow.core.kv import model_identity
from lcflow.testing.tiny import load_tiny


@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir, tmp_path_factory):
    """The tiny pair, an LCF-X adapter for it, and an adapters directory holding it and an LCF one."""
    sharer_dir, receiver_dir = tiny_dir("llama", 300, 3), tiny_dir("gemma3", 400, 2)
    s, r = load_tiny(sharer_dir), load_tiny(receiver_dir)
    adapters = tmp_path_factory.mktemp("demo-adapters")
    for mode, options in (("lcfx", {"packet": "spans"}), ("lcf", {})):  # spans: SELECTED has sentences
        adapter = LatentAdapter.for_models(
            mode, model_identity(*s), model_identity(*r), bottleneck=16, slots=4, **options
        )
        for name, weight in adapter.named_parameters():  # latents that move the answer
            if name.endswith("up.weight") or (mode == "lcfx" and weight.dim() == 2):
                torch.nn.init.normal_(weight, std=0.3)
        adapter.save_pretrained(adapters / f"tiny-{mode}")
    # the pair's text reader, as the shipped adapters hold one: the demo adds a READER line
    TextReader.for_model(*r, "forward-selected", rank=4).save_pretrained(adapters / "tiny-reader-selected")
    return sharer_dir, receiver_dir, adapters


def demo_command(tiny_adapter, run_dir, *extra: str) -> list[str]:
    sharer_dir, receiver_dir, adapters = tiny_adapter
    command = [sys.executable, "-m", "lcflow.cli", "demo", "--sharer-model", str(sharer_dir)]
    command += ["--receiver-model", str(receiver_dir), "--adapter", str(adapters / "tiny-lcfx"), "--n", "2"]
    command += ["--max-new-tokens", "3", "--run-dir", str(run_dir), "--startup-timeout-s", "120"]
    return command + list(extra)


def test_demo_runs_every_mode_from_one_pair_of_services(tiny_adapter, tmp_path):
    """Cross-context questions through LCF-X and same-context ones through LCF, each beside the note,
    from one sharer and one receiver process serving the adapters directory."""
    _, _, adapters = tiny_adapter
    command = demo_command(tiny_adapter, tmp_path / "run", "--adapters", str(adapters), "--same-n", "1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    check_demo_output(done.stdout, questions=2, same=1)
    assert done.stdout.count("   READER: ") == 3  # the reader in --adapters: two answers and a summary
    assert done.stdout.count("started ") == 2  # one process per side served both parts


def test_an_lcf_adapter_for_another_receiver_is_skipped_with_the_services_reason(
    tiny_adapter, tiny_dir, tmp_path
):
    """An LCF adapter that fits the sharer's model but was made for another receiver is listed
    usable by the sharer; the receiver refuses it, so the demo skips the part and says why."""
    sharer_dir, _, adapters = tiny_adapter
    other_receiver = load_tiny(tiny_dir("gemma3", 500, 2))
    mixed = tmp_path / "adapters"
    shutil.copytree(adapters / "tiny-lcfx", mixed / "tiny-lcfx")
    LatentAdapter.for_models(
        "lcf", model_identity(*load_tiny(sharer_dir)), model_identity(*other_receiver), bottleneck=16
    ).save_pretrained(mixed / "tiny-lcf-other")
    command = demo_command(tiny_adapter, tmp_path / "run", "--adapters", str(mixed), "--same-n", "1")
    command[command.index("--adapter") + 1] = str(mixed / "tiny-lcfx")  # the default, from --adapters
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    check_demo_output(done.stdout, questions=2)
    assert "cannot serve LCF for this pair" in done.stdout and "tiny-lcf-other" in done.stdout


def test_demo_runs_both_services_and_compares_text_with_lcfx(tiny_adapter, tmp_path):
    """Without an LCF adapter for the pair (the repository's adapters/ hold none for the tiny
    models), the same-context part is skipped and says so."""
    done = subprocess.run(
        demo_command(tiny_adapter, tmp_path / "run"), capture_output=True, text=True, timeout=300
    )
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
    with pytest.raises(SystemExit, match="build_adapters.sh"):
        demo.find_adapter("", said.append)
