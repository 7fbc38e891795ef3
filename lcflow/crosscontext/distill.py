"""Task training on top of the dense alignment: distillation from the receiver reading the text.

The span adapter starts as the closed-form alignment (`lcflow align --adapter-out`); this
refines both halves with the LLMs frozen. For each training sample:

    teacher  = the receiver reading [sharer document, own context, question] as text
    student  = the receiver reading [span packet, own context, question]
    loss     = CE(answer | student) + kl_weight * KL(teacher || student)   over the answer's tokens

The teacher's distribution is dense (every vocabulary entry at every answer position), so a
few hundred samples carry far more signal than the answer's identity alone; the teacher runs
without gradients on the fly (one prefill per sample). Only answer positions get logits.
Samples are drawn from the train split (vocabulary disjoint from the test split); the
held-out ships-cross family is never read. Seeded, resumable (lcflow.training.Trainer).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lcflow.adapter import LatentAdapter
from lcflow.handoff import Receiver, Sharer
from lcflow.kv import model_identity
from lcflow.training import Trainer, answer_ids


def answer_logits(model, prepared, target: torch.Tensor) -> torch.Tensor:
    """Logits [answer tokens, vocab] with the answer teacher-forced on top of a prepared cache."""
    tail = torch.cat([prepared.input_ids[:, -1:], target[None, :-1]], dim=1).to(model.device)
    out = model(input_ids=tail, past_key_values=prepared.cache, use_cache=True, logits_to_keep=len(target))
    return out.logits[0].float()


class SpanDistillTrainer(Trainer):
    """Trains a span-packet LCF-X adapter from its alignment initialisation (cfg.init_adapter)."""

    def build_adapter(self, sharer_pair: tuple, receiver_pair: tuple):
        (ms, ts), (mr, tr) = sharer_pair, receiver_pair
        adapter = LatentAdapter.from_pretrained(
            self.cfg.init_adapter,
            sharer=model_identity(ms, ts, name=self.cfg.sharer),
            receiver=model_identity(mr, tr, name=self.cfg.receiver),
        )
        if adapter.config.packet != "spans":
            raise ValueError(f"{self.cfg.init_adapter} is not a span-packet LCF-X adapter")
        adapter.requires_grad_(True)
        adapter = adapter.to(mr.device)
        self.sharer = Sharer(ms, ts, adapter.encoder, adapter.config)
        self.receiver = Receiver(mr, tr, adapter.decoder, adapter.config)
        return adapter

    def gate_penalty(self) -> torch.Tensor:
        return torch.zeros(())  # span packets have no gates

    def sample_loss(self, sample) -> torch.Tensor:
        prompt = self.format_prompt(sample, include_context=False)
        target = answer_ids(self.receiver.tokenizer, sample.answers[0]).to(self.receiver.model.device)
        student = answer_logits(self.receiver.model, self.prepare(sample), target)
        loss = F.cross_entropy(student, target)
        if self.cfg.kl_weight > 0:
            with torch.no_grad():
                teacher_input = self.receiver.prepare_plain(
                    prompt, [sample.sharer_context, sample.receiver_context]
                )
                teacher = answer_logits(self.receiver.model, teacher_input, target)
            kl = F.kl_div(
                student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            loss = loss + self.cfg.kl_weight * kl
        return loss
