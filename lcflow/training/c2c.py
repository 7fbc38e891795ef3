"""Training the C2C baseline: a C2CFuser for a sharer/receiver pair, both LLMs frozen.

The step, the optimiser, the schedule and the checkpoint/resume/loss-curve files are the LCF
trainer's (lcflow.training.train.Trainer); only the path per sample differs, and it is the one C2C
inference takes (lcflow.handoff.c2c.c2c_prepare):

    sharer prefill of the context (no gradients)
    receiver prefill of [context + prompt] up to its last token (no gradients)
    the sharer's KV aligned onto the receiver's context tokens by character spans
    fuse into the receiver's cache, with gradients through the fuser
    answer tokens on top of the fused cache -> cross-entropy on the answer only (answer_loss)

C2C fuses two caches of the *same* text, so only same-context tasks (facts-same) are accepted.
Each step draws its Gumbel-sigmoid gates at the temperature `anneal` gives for that step,
annealed over the whole run as C2C does (its 1929-step run is its ANNEAL_STEPS); the
temperature is not a weight, so it is recomputed from the step after a resume.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lcflow.adapter.c2c import C2CFuser, record_sharer_rope
from lcflow.core.kv import model_identity
from lcflow.handoff.c2c import c2c_prepare
from lcflow.handoff.pair import PreparedInput, Receiver, Sharer
from lcflow.tasks import get_task
from lcflow.training.train import TrainConfig, Trainer


class C2CTrainer(Trainer):
    """Trains a C2CFuser (cfg.mode "c2c") with the LCF trainer's step, schedule and files."""

    adapter_class = C2CFuser

    def __init__(self, cfg: TrainConfig, sharer_pair=None, receiver_pair=None):
        check_c2c_config(cfg)
        super().__init__(cfg, sharer_pair, receiver_pair)

    def build_adapter(self, sharer_pair: tuple, receiver_pair: tuple) -> C2CFuser:
        (ms, ts), (mr, tr) = sharer_pair, receiver_pair
        fuser = C2CFuser.for_models(
            model_identity(ms, ts, name=self.cfg.sharer),
            model_identity(mr, tr, name=self.cfg.receiver),
            layer_map_strategy=self.cfg.layer_map,
        ).to(mr.device)
        record_sharer_rope(fuser.config, ms)  # so that the receiver service can serve it
        self.sharer = Sharer(ms, ts)  # C2C sends the sharer's raw KV: no encoder half
        self.receiver = Receiver(mr, tr)
        return fuser

    def prepare(self, sample) -> PreparedInput:
        prompt = self.format_prompt(sample, include_context=False)
        sharer = (self.sharer.model, self.sharer.tokenizer)
        prepared, _ = c2c_prepare(self.adapter, sharer, self.receiver, sample.sharer_context, prompt)
        return prepared

    def gate_penalty(self) -> torch.Tensor:
        """Mean sigmoid of the key and value gate logits: what the hard gate opens at (> 0.5)."""
        logits = [
            path.gate_logit
            for projector in self.adapter.projectors.values()
            for path in (projector.key, projector.value)
        ]
        return torch.sigmoid(torch.stack(logits)).mean()

    def anneal(self) -> float:
        """The gate temperature for the coming step (1.0 at step 0, 0.001 at the last)."""
        return self.adapter.anneal(self.step, anneal_steps=max(1, self.cfg.steps - 1))

    def train_step(self) -> float:
        self.anneal()
        return super().train_step()

    def resume(self) -> None:
        super().resume()
        self.anneal()  # a fresh fuser starts at 1.0 whatever step the checkpoint reached


def check_c2c_config(cfg: TrainConfig) -> None:
    """Refuse settings C2C cannot train with, before any model is loaded."""

    if cfg.mode != "c2c":
        raise ValueError(f"train_c2c trains mode 'c2c', not {cfg.mode!r}; use lcflow.training.train.Trainer")
    if not get_task(cfg.task).same_context:
        raise ValueError(
            f"C2C fuses two caches of the same text; task {cfg.task!r} gives the receiver another "
            "document. Use a same-context task (e.g. --task facts-same)."
        )


def train_c2c(cfg: TrainConfig, sharer_pair=None, receiver_pair=None) -> Path:
    """Train (or resume) a C2C fuser to cfg.steps; returns cfg.out, loadable with C2CFuser.from_pretrained."""
    return C2CTrainer(cfg, sharer_pair, receiver_pair).run()
