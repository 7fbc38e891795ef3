"""Task training on top of the dense alignment: distillation from the receiver reading the text.

The span adapter starts as the closed-form alignment (`lcflow align --adapter-out`); this
refines both halves with the LLMs frozen. For each training sample:

    teacher  = the receiver reading [sharer document, own context, question] as text, or, with
               cfg.teacher_adapter, [that adapter's span packet, own context, question]
    student  = the receiver reading [span packet, own context, question]
    loss     = CE(answer | student) + kl_weight * KL(teacher || student)   over the answer's tokens
             + contrast_weight * max(0, contrast_margin + CE(answer | student)
                                        - CE(answer | student given another sample's packet))

The teacher's distribution is dense (every vocabulary entry at every answer position), so a
few hundred samples carry far more signal than the answer's identity alone; the teacher runs
without gradients on the fly (one prefill per sample). Only answer positions get logits.
The hinge (off by default) is for answers that must *use* the packet without being a word of
it (facts-twohop: the packet holds the link, the receiver's own document the answer). Trained on
CE and KL alone, a mix of such samples taught the receiver to guess a value of the asked kind
from its own document, as well with any packet (docs/lcfx.md section 6); the hinge is zero only
where the right packet explains the answer by `contrast_margin` nats more than another's.
The other packet is the next training sample's of the same task (its own question selects it).
With cfg.receiver_lora, a LoRA on the receiver (lcflow.adapter.reader, channel "lcfx") trains
beside the decoder, so the packet is read by a receiver as trainable as a text reader's; the
teacher stays the plain receiver. It is saved in OUT/receiver-reader.
A teacher adapter (frozen) is how a compressed packet learns from a full-width one: a student of
bottleneck b < K/V width starts from the reduced-rank alignment and matches what the receiver
reads from the wide packet, which the document-reading teacher does not say.
Samples are drawn from the train split (vocabulary disjoint from the test split); the
held-out ships-cross family is never read. Seeded, resumable (lcflow.training.train.Trainer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from lcflow.adapter import LatentAdapter
from lcflow.adapter.reader import RECEIVER_READER, TextReader
from lcflow.core.kv import model_identity
from lcflow.handoff.pair import Receiver, Sharer
from lcflow.training.train import CHECKPOINT_DIR, Trainer, answer_ids, prepare_for_sample


def answer_logits(model, prepared, target: torch.Tensor) -> torch.Tensor:
    """Logits [answer tokens, vocab] with the answer teacher-forced on top of a prepared cache."""
    tail = torch.cat([prepared.input_ids[:, -1:], target[None, :-1]], dim=1).to(model.device)
    out = model(input_ids=tail, past_key_values=prepared.cache, use_cache=True, logits_to_keep=len(target))
    return out.logits[0].float()


def packet_donors(samples: list) -> dict:
    """For each sample id, the next sample (cyclically) of the same task: whose packet to send
    as the control. Same task, so a two-hop sample is contrasted with another link; a task with
    a single sample borrows the next sample of the list."""
    by_task: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(index)
    donors = {}
    for indices in by_task.values():
        for position, index in enumerate(indices):
            donor = indices[(position + 1) % len(indices)] if len(indices) > 1 else (index + 1) % len(samples)
            donors[samples[index].id] = samples[donor]
    return donors


class SpanDistillTrainer(Trainer):
    """Trains a span-packet LCF-X adapter from its alignment initialisation (cfg.init_adapter)."""

    def __init__(self, cfg, sharer_pair=None, receiver_pair=None):
        super().__init__(cfg, sharer_pair, receiver_pair)
        self.donors = packet_donors(self.samples) if cfg.contrast_weight > 0 else {}

    def load_span_adapter(self, path: str, sharer_pair: tuple, receiver_pair: tuple) -> LatentAdapter:
        """A span-packet LCF-X adapter from `path`, checked against the two models, on the
        receiver's device (the student and the teacher load alike)."""
        (ms, ts), (mr, tr) = sharer_pair, receiver_pair
        adapter = LatentAdapter.from_pretrained(
            path,
            sharer=model_identity(ms, ts, name=self.cfg.sharer),
            receiver=model_identity(mr, tr, name=self.cfg.receiver),
        )
        if adapter.config.mode != "lcfx" or adapter.config.packet != "spans":
            raise ValueError(f"{path} is not a span-packet LCF-X adapter")
        return adapter.to(mr.device)

    def build_adapter(self, sharer_pair: tuple, receiver_pair: tuple):
        (ms, ts), (mr, tr) = sharer_pair, receiver_pair
        adapter = self.load_span_adapter(self.cfg.init_adapter, sharer_pair, receiver_pair)
        adapter.requires_grad_(True)
        self.sharer = Sharer(ms, ts, adapter.encoder, adapter.config)
        self.teacher_model, self.plain = mr, Receiver(mr, tr)  # the KL's teacher: the plain receiver
        self.reader = None
        if self.cfg.receiver_lora:
            self.reader = TextReader.for_model(
                mr, tr, "lcfx", rank=self.cfg.receiver_lora, name=self.cfg.receiver
            )
            mr = self.reader.model  # the student reads through its own LoRA'd copy
        self.receiver = Receiver(mr, tr, adapter.decoder, adapter.config)
        self.teacher = self.build_teacher(sharer_pair, receiver_pair) if self.cfg.teacher_adapter else None
        return adapter

    def build_teacher(self, sharer_pair: tuple, receiver_pair: tuple) -> tuple[Sharer, Receiver]:
        """The frozen teacher adapter's two halves (cfg.teacher_adapter), on the same models."""
        (ms, ts), (mr, tr) = sharer_pair, receiver_pair
        teacher = self.load_span_adapter(self.cfg.teacher_adapter, sharer_pair, receiver_pair)
        teacher = teacher.eval().requires_grad_(False)
        return Sharer(ms, ts, teacher.encoder, teacher.config), Receiver(
            mr, tr, teacher.decoder, teacher.config
        )

    def teacher_input(self, sample, prompt: str):
        """What the KL's teacher reads: the teacher adapter's packet, or the document as text."""
        if self.teacher is not None:
            return prepare_for_sample(*self.teacher, "lcfx", sample, prompt)
        return self.plain.prepare_plain(prompt, [sample.sharer_context, sample.receiver_context])

    def gate_penalty(self) -> torch.Tensor:
        return torch.zeros(())  # span packets have no gates

    # --- the receiver-side LoRA (cfg.receiver_lora), trained, saved and resumed with the adapter ---

    def extra_parameters(self) -> list:
        return list(self.reader.parameters()) if self.reader is not None else []

    def save_checkpoint(self) -> None:
        super().save_checkpoint()
        if self.reader is not None:
            self.reader.save_pretrained(self.out / CHECKPOINT_DIR / RECEIVER_READER, dtype=torch.float32)

    def save_final(self) -> Path:
        out = super().save_final()
        if self.reader is not None:
            self.reader.config.training = self.provenance()
            self.reader.save_pretrained(out / RECEIVER_READER, dtype=torch.float32)
        return out

    def load_weights(self, directory: Path) -> None:
        super().load_weights(directory)
        if self.reader is not None:
            self.reader.load_weights(directory / RECEIVER_READER)

    def packet_donor(self, sample):
        """The training sample whose packet is the control: the next one of the same task."""
        return self.donors[sample.id]

    def sample_loss(self, sample) -> torch.Tensor:
        prompt = self.format_prompt(sample, include_context=False)
        target = answer_ids(self.receiver.tokenizer, sample.answers[0]).to(self.receiver.model.device)
        student = answer_logits(self.receiver.model, self.prepare(sample), target)
        loss = F.cross_entropy(student, target)
        if self.cfg.contrast_weight > 0:
            other = prepare_for_sample(
                self.sharer,
                self.receiver,
                "lcfx",
                sample,
                prompt,
                packet_from=self.packet_donor(sample),
                wire=self.cfg.wire,
            )
            other_ce = F.cross_entropy(answer_logits(self.receiver.model, other, target), target)
            hinge = F.relu(self.cfg.contrast_margin + loss - other_ce)
            loss = loss + self.cfg.contrast_weight * hinge
        if self.cfg.kl_weight > 0:
            with torch.no_grad():
                teacher = answer_logits(self.teacher_model, self.teacher_input(sample, prompt), target)
            kl = F.kl_div(
                student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            loss = loss + self.cfg.kl_weight * kl
        return loss
