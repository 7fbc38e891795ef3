import contextlib
import io
import json

import pytest
import torch

from lcflow.adapter.c2c import TEMPERATURE_END, TEMPERATURE_START, C2CFuser
from lcflow.cli import main
from lcflow.core.kv import model_identity
from lcflow.tasks import get_task
from lcflow.training.c2c import C2CTrainer, train_c2c
from lcflow.training.train import TrainConfig


def make_config(out, steps: int, **overrides) -> TrainConfig:
    options = dict(mode="c2c", task="facts-same", steps=steps, batch_size=2, lr=1e-2, checkpoint_every=5)
    return TrainConfig(sharer="tiny-sharer", receiver="tiny-receiver", out=str(out), **options | overrides)


def make_trainer(tiny_pair, out, steps: int, **overrides) -> C2CTrainer:
    return C2CTrainer(make_config(out, steps, **overrides), *tiny_pair)


def test_short_training_lowers_held_out_loss(tiny_pair, tmp_path):
    """Held-out loss is measured with the inference (hard) gates, which start closed: the
    untrained fuser leaves the receiver as it is, so a drop needs gates the training opened
    and a fusion that helps. The tiny receiver's weak logits make an absolute drop the bar
    (seeded and deterministic; measured 6.11 -> 5.97)."""
    trainer = make_trainer(tiny_pair, tmp_path, steps=50)
    held_out = get_task("facts-same").samples("train", 8, seed=99)
    before = trainer.evaluate_loss(held_out)
    out = trainer.run()
    after = trainer.evaluate_loss(held_out)
    assert after < before - 0.05, (before, after)
    assert any(p.is_open() for p in trainer.adapter.projectors.values())
    assert trainer.adapter.temperature == pytest.approx(TEMPERATURE_END)  # annealed over the run
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "checkpoint" / "trainer_state.pt").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 50 and log["steps_done"] == 50
    (ms, ts), (mr, tr) = tiny_pair
    reloaded = C2CFuser.from_pretrained(out, sharer=model_identity(ms, ts), receiver=model_identity(mr, tr))
    assert reloaded.config.training["mode"] == "c2c" and reloaded.config.training["task"] == "facts-same"
    for name, weight in trainer.adapter.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], weight)


def test_resume_continues_exactly_where_it_stopped(tiny_pair, tmp_path):
    """Dropout and Gumbel gates draw random numbers every step, and the temperature is not a
    weight: both must come back from the checkpoint for the losses to match."""
    straight = make_trainer(tiny_pair, tmp_path / "a", steps=6)
    straight.run()
    interrupted = make_trainer(tiny_pair, tmp_path / "b", steps=6, checkpoint_every=3)
    for _ in range(3):  # as run() would, then the process dies after the step-3 checkpoint
        interrupted.train_step()
    interrupted.save_checkpoint()
    resumed = make_trainer(tiny_pair, tmp_path / "b", steps=6, checkpoint_every=3)
    resumed.resume()
    assert resumed.step == 3 and resumed.adapter.temperature < TEMPERATURE_START
    resumed.run()
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for name, weight in straight.adapter.state_dict().items():
        torch.testing.assert_close(resumed.adapter.state_dict()[name], weight)


def test_cross_context_task_is_refused(tiny_pair, tmp_path):
    with pytest.raises(ValueError, match="same-context task"):
        make_trainer(tiny_pair, tmp_path, steps=2, task="facts-cross")


def test_cli_train_c2c_writes_a_loadable_adapter(tiny_dir, tiny_pair, tmp_path):
    out = tmp_path / "c2c"
    argv = ["train", "--mode", "c2c", "--task", "facts-same", "--steps", "2", "--batch-size", "1"]
    argv += ["--sharer", str(tiny_dir("llama", 300, 3)), "--receiver", str(tiny_dir("gemma3", 400, 2))]
    argv += ["--out", str(out), "--device", "cpu"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    assert str(out) in printed.getvalue()
    (ms, ts), (mr, tr) = tiny_pair
    fuser = C2CFuser.from_pretrained(out, sharer=model_identity(ms, ts), receiver=model_identity(mr, tr))
    assert fuser.config.training["steps_done"] == 2 and len(fuser.layers) == mr.config.num_hidden_layers


def test_train_c2c_refuses_another_mode(tmp_path):
    with pytest.raises(ValueError, match="mode 'c2c'"):
        train_c2c(make_config(tmp_path, steps=1, mode="lcf"))
