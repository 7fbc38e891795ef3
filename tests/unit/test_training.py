import json

import pytest
import torch

from lcflow.adapter import LatentAdapter
from lcflow.tasks import get_task
from lcflow.training.train import TrainConfig, Trainer


def make_trainer(tiny_pair, tmp_path, mode, steps, **overrides):
    options = dict(
        mode=mode, task="facts-cross" if mode == "lcfx" else "facts-same", steps=steps, batch_size=2
    )
    options |= dict(lr=1e-2, bottleneck=16, slots=4, checkpoint_every=5, seed=0) | overrides
    cfg = TrainConfig(sharer="tiny-sharer", receiver="tiny-receiver", out=str(tmp_path / mode), **options)
    return Trainer(cfg, *tiny_pair)


@pytest.mark.parametrize("mode", ["lcf", "lcfx"])
def test_short_training_lowers_held_out_loss(tiny_pair, tmp_path, mode):
    """Unseen samples of the training distribution. A random tiny receiver's logits span only
    about +-1.3 (embeddings of std 0.02), so from ~ln(vocab) the loss cannot fall far: the bar is
    an absolute drop, well above float noise (the run is seeded and deterministic)."""
    trainer = make_trainer(tiny_pair, tmp_path, mode, steps=50)
    held_out = get_task(trainer.cfg.task).samples("train", 8, seed=99)
    before = trainer.evaluate_loss(held_out)
    out = trainer.run()
    after = trainer.evaluate_loss(held_out)
    assert after < before - 0.05, (before, after)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "checkpoint" / "trainer_state.pt").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 50 and log["steps_done"] == 50
    reloaded = LatentAdapter.from_pretrained(out)
    assert reloaded.config.training["task"] == trainer.cfg.task


def test_resume_continues_exactly_where_it_stopped(tiny_pair, tmp_path):
    straight = make_trainer(tiny_pair, tmp_path / "a", "lcf", steps=6)
    straight.run()
    interrupted = make_trainer(tiny_pair, tmp_path / "b", "lcf", steps=6, checkpoint_every=3)
    for _ in range(3):  # as run() would, then the process dies after the step-3 checkpoint
        interrupted.train_step()
    interrupted.save_checkpoint()
    resumed = make_trainer(tiny_pair, tmp_path / "b", "lcf", steps=6, checkpoint_every=3)
    resumed.run()
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-4)


def test_resume_refuses_other_settings(tiny_pair, tmp_path):
    make_trainer(tiny_pair, tmp_path, "lcf", steps=2, checkpoint_every=2).run()
    with pytest.raises(ValueError, match="other settings"):
        make_trainer(tiny_pair, tmp_path, "lcf", steps=4, lr=5e-2).run()


def test_wire_in_the_loop_forwards_what_the_receiver_gets_and_passes_gradients_straight():
    from lcflow.eval.harness import through_the_wire
    from lcflow.handoff.pair import Latents
    from lcflow.training.train import through_the_wire_straight

    torch.manual_seed(0)
    z = torch.randn(1, 4, 64, requires_grad=True)
    received = Latents("lcfx", {3: z.detach().clone()})
    through_the_wire(received, "int4")
    out = through_the_wire_straight(Latents("lcfx", {3: z}), "int4").layers[3]
    assert torch.equal(out.detach(), received.layers[3]) and not torch.equal(out.detach(), z.detach())
    weights = torch.randn_like(z)
    (out * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # the identity's gradient, as if nothing had been rounded
    exact = Latents("lcfx", {3: z})
    assert through_the_wire_straight(exact, "exact").layers[3] is z
