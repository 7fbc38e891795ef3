"""User mistakes at the command line: one line saying what is wrong and what to do, exit 2, before
anything slow (no model load, no model hub), and a traceback only with --debug."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_c2c_adapter_dir

from lcflow.adapter import LatentAdapter
from lcflow.cli import main
from lcflow.commands.preflight import check_service
from lcflow.core.errors import UsageError
from lcflow.core.kv import model_identity
from lcflow.serving.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_serving(monkeypatch):
    """Starting a service (and so loading its model) fails the test: every check must come first."""
    import lcflow.serving.receiver as receiver
    import lcflow.serving.sharer as sharer

    for module in (receiver, sharer):
        monkeypatch.setattr(module, "serve", lambda *a, **k: pytest.fail("the service started"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_pair, tmp_path_factory):
    (ms, ts), (mr, tr) = tiny_pair
    adapter = LatentAdapter.for_models(
        "lcfx", model_identity(ms, ts), model_identity(mr, tr), bottleneck=16, slots=4
    )
    return adapter.save_pretrained(tmp_path_factory.mktemp("adapter"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_unknown_model_names_lcflow_models_list_at_once(no_serving, capsys):
    started = time.monotonic()
    assert main(["serve", "receiver", "--model", "smollm2-135m"]) == 2
    assert time.monotonic() - started < 5  # no hub, no retries
    err = one_line_error(capsys)
    assert "'smollm2-135m' is not a known model nor a local directory" in err
    assert "`lcflow models list`" in err


def test_known_model_not_pulled_says_how_to_pull_it(no_serving, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LCFLOW_MODEL_CACHE", str(tmp_path))
    assert main(["serve", "sharer", "--model", "gemma3-270m", "--receiver", "x:1"]) == 2
    assert "lcflow models pull gemma3-270m" in one_line_error(capsys)


def test_a_missing_model_directory_is_named(no_serving, capsys, tmp_path):
    assert main(["serve", "receiver", "--model", str(tmp_path / "nope")]) == 2
    assert "no such directory" in one_line_error(capsys)


def test_bad_adapter_directories_are_refused_before_the_model_loads(
    no_serving, capsys, tiny_dir, adapter_dir, tmp_path
):
    receiver_model = str(tiny_dir("gemma3", 400, 2))
    serve = ["serve", "receiver", "--model", receiver_model, "--adapter"]

    assert main([*serve, str(tmp_path / "missing")]) == 2
    assert "no such directory" in one_line_error(capsys)

    assert main([*serve, str(tmp_path)]) == 2  # a directory, but no adapter in it
    assert "is not an adapter directory" in one_line_error(capsys)

    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (half / "encoder.safetensors").write_bytes((adapter_dir / "encoder.safetensors").read_bytes())
    assert main([*serve, str(half)]) == 2  # the receiver needs the decoder half
    assert "has no decoder.safetensors" in one_line_error(capsys)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    assert main([*serve, str(broken)]) == 2
    assert "adapter_config.json cannot be used" in one_line_error(capsys)


def test_an_adapter_for_other_models_is_refused_before_the_model_loads(
    no_serving, capsys, tiny_dir, adapter_dir
):
    other = str(tiny_dir("llama", 300, 3))  # the sharer's model, served as a receiver by mistake
    assert main(["serve", "receiver", "--model", other, "--adapter", str(adapter_dir)]) == 2
    err = one_line_error(capsys)
    assert "does not fit --model" in err and "this adapter's receiver is" in err


def test_a_fitting_adapter_passes_the_checks(tiny_dir, adapter_dir):
    """The checks read only configs and tokenizers: they must reach the verdict loading would."""
    for role, family in (("receiver", ("gemma3", 400, 2)), ("sharer", ("llama", 300, 3))):
        config = ServiceConfig(role, model=str(tiny_dir(*family)), adapter=str(adapter_dir), receiver="x:1")
        check_service(config)


def test_c2c_adapters_pass_the_checks_and_one_without_the_sharer_rope_is_refused(
    no_serving, capsys, tiny_dir, tiny_pair, tmp_path
):
    """A C2C adapter is served: its sharer loads no weights, its receiver needs the fuser and the
    sharer's RoPE (recorded since C2C is served), refused with the fix before the model loads."""
    served = tiny_c2c_adapter_dir(tiny_pair, tmp_path / "c2c")
    for role, family in (("receiver", ("gemma3", 400, 2)), ("sharer", ("llama", 300, 3))):
        check_service(ServiceConfig(role, model=str(tiny_dir(*family)), adapter=served, receiver="x:1"))
    old = tiny_c2c_adapter_dir(tiny_pair, tmp_path / "old", with_rope=False)
    assert main(["serve", "receiver", "--model", str(tiny_dir("gemma3", 400, 2)), "--adapter", old]) == 2
    assert "sharer_rope" in one_line_error(capsys)


def test_a_missing_context_file_is_one_line(capsys, tmp_path):
    assert main(["handoff", "--context-file", str(tmp_path / "notes.txt"), "--prompt", "Where?"]) == 2
    assert "--context-file" in (err := one_line_error(capsys)) and "does not exist" in err
    assert main(["handoff", "--context-file", str(tmp_path), "--prompt", "Where?"]) == 2
    assert "is a directory" in one_line_error(capsys)


def test_unreadable_security_files_are_one_line(capsys, tmp_path):
    argv = ["handoff", "--context", "x", "--prompt", "Where?", "--auth-token-file", str(tmp_path / "token")]
    assert main(argv) == 2
    assert "token file" in one_line_error(capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UsageError):
        main(["--debug", "handoff", "--context-file", str(tmp_path / "notes.txt"), "--prompt", "Where?"])


def test_eval_refuses_an_unknown_model_before_loading(capsys, tmp_path):
    argv = ["eval", "--sharer", "smollm2", "--receiver", "gemma3-270m", "--n", "1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--sharer 'smollm2' is not a known model" in one_line_error(capsys)


def test_the_real_command_prints_no_traceback():
    """As a user runs it: a separate process, its stderr as printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lcflow.cli", "serve", "receiver", "--model", "gemma-270m"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "`lcflow models list`" in done.stderr
    assert time.monotonic() - started < 60  # imports only: no model hub, no 20 s of retries


def test_packet_diagnostics_refuse_a_slot_adapter_before_loading_models(adapter_dir, capsys, tmp_path):
    assert main(["bench", "packets", "--adapter", str(adapter_dir)]) == 2
    assert "is not a span-packet LCF-X adapter" in one_line_error(capsys)
    assert main(["bench", "packets", "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in one_line_error(capsys)


def test_compress_refuses_a_slot_adapter_and_a_bottleneck_that_is_not_narrower(
    adapter_dir, tiny_pair, capsys, tmp_path
):
    from helpers import same_model_alignment, span_adapter

    out = str(tmp_path / "out")
    assert main(["compress", str(adapter_dir), "--bottleneck", "8", "--out", out]) == 2
    assert "only those can be narrowed" in one_line_error(capsys)
    _, receiver = tiny_pair
    spans = span_adapter(receiver, receiver, same_model_alignment(receiver, bottleneck=16), slots=4)
    spans.save_pretrained(tmp_path / "spans")
    assert main(["compress", str(tmp_path / "spans"), "--bottleneck", "8", "16", "--out", out]) == 2
    assert "--bottleneck must be between 1 and the adapter's width minus one (15), not 16" in one_line_error(
        capsys
    )
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_init_reader_needs_a_reader_directory_and_the_text_reader_mode(capsys, tmp_path):
    base = ["train", "--sharer", "s", "--receiver", "r", "--out", str(tmp_path / "o")]
    assert main([*base, "--init-reader", str(tmp_path)]) == 2
    assert "give --mode text-reader too" in one_line_error(capsys)
    assert main([*base, "--mode", "text-reader", "--init-reader", str(tmp_path)]) == 2
    assert "not a text reader's directory" in one_line_error(capsys)
