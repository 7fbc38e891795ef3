"""Training a text reader (lcflow.adapter.reader): the LCF-X span adapter's recipe, read as text.

Everything but the channel is the LCF-X adapter's (lcflow.training.distill): the same task
samples in the same order (the seed), steps, batch, learning rate and schedule, and the same loss
over the answer's tokens:

    teacher  = the receiver reading [sharer document, own context, question] as text (no LoRA)
    student  = the reader reading   [channel text,    own context, question]
    loss     = CE(answer | student) + kl_weight * KL(teacher || student)

where the channel text is the sentences holding the LCF-X adapter's selection for this question
("forward-selected": `--init-adapter` names that adapter, whose selection head and budget are
used) or the whole document ("forward"). The selection runs without gradients on the frozen
sharer, as the LCF-X adapter's own does. Seeded, resumable (lcflow.training.train.Trainer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from lcflow.adapter import LatentAdapter
from lcflow.adapter.reader import ReaderConfig, TextReader
from lcflow.core.kv import model_identity
from lcflow.core.prompting import render_input
from lcflow.handoff.pair import Receiver, Sharer, reader_contexts
from lcflow.training.train import Trainer, answer_ids


def answer_logits_from_text(model, tokenizer, prompt: str, contexts: list[str], target: torch.Tensor):
    """Logits [answer tokens, vocab] of `model` reading [contexts, prompt] with the answer
    teacher-forced, in one pass with gradients (only the answer positions get logits)."""
    rendered = render_input(tokenizer, prompt, contexts)
    ids = torch.cat([rendered.input_ids[0], target[:-1].cpu()])[None].to(model.device)
    out = model(input_ids=ids, logits_to_keep=len(target))
    return out.logits[0].float()


def start_from_reader(reader: TextReader, directory: str) -> None:
    """Put a trained reader's LoRA weights into `reader`, refusing one that reads another channel,
    has another rank or was trained for another receiver (its weights would not fit or mean)."""
    trained = ReaderConfig.load(directory)
    want = reader.config
    if (trained.channel, trained.rank) != (want.channel, want.rank):
        raise ValueError(
            f"--init-reader {directory} reads {trained.channel} with rank {trained.rank}; this run "
            f"trains {want.channel} with rank {want.rank}: give the same --channel and --rank"
        )
    if not trained.receiver.same_model(want.receiver):
        raise ValueError(
            f"--init-reader {directory} was trained for {trained.receiver.short()}, not "
            f"{want.receiver.short()}; give a reader of this receiver"
        )
    reader.load_weights(directory)


class ReaderTrainer(Trainer):
    """Trains a text reader for cfg.channel; cfg.init_adapter is the LCF-X adapter whose
    selection forward-selected forwards (needed for that channel only)."""

    adapter_class = TextReader

    def build_adapter(self, sharer_pair: tuple, receiver_pair: tuple):
        (ms, ts), (mr, tr) = sharer_pair, receiver_pair
        self.sharer, self.selection_adapter = None, None
        if self.cfg.channel == "forward-selected":
            if not self.cfg.init_adapter:
                raise ValueError(
                    "--channel forward-selected forwards the sentences an LCF-X adapter selects: "
                    "give that adapter with --init-adapter DIR"
                )
            lcfx = LatentAdapter.from_pretrained(
                self.cfg.init_adapter,
                sharer=model_identity(ms, ts, name=self.cfg.sharer),
                receiver=model_identity(mr, tr, name=self.cfg.receiver),
            )
            if lcfx.config.packet not in ("spans", "bridge"):
                raise ValueError(f"{self.cfg.init_adapter} is not a span or bridge LCF-X adapter")
            self.sharer = Sharer(ms, ts, lcfx.encoder, lcfx.config)
        reader = TextReader.for_model(mr, tr, self.cfg.channel, rank=self.cfg.rank, name=self.cfg.receiver)
        if self.cfg.init_reader:
            start_from_reader(reader, self.cfg.init_reader)
        reader.config.selection_adapter = self.cfg.init_adapter if self.sharer is not None else ""
        self.teacher_model = mr  # the receiver itself (the reader works on a copy), reading the document
        self.receiver = Receiver(reader.model, tr)
        self._channel_texts: dict[str, str] = {}
        return reader

    def gate_penalty(self) -> torch.Tensor:
        return torch.zeros(())  # a reader has no gates

    def channel_text(self, sample) -> str:
        """The text this sample's sharer forwards (selected once, without gradients)."""
        if self.cfg.channel == "forward":
            return sample.sharer_context
        if sample.id not in self._channel_texts:
            prompt = self.format_prompt(sample, include_context=False)
            with torch.no_grad():
                context = self.sharer.prefill(sample.sharer_context)
                self._channel_texts[sample.id] = self.sharer.selected_text(context, prompt)
        return self._channel_texts[sample.id]

    def sample_loss(self, sample) -> torch.Tensor:
        prompt = self.format_prompt(sample, include_context=False)
        tokenizer = self.receiver.tokenizer
        target = answer_ids(tokenizer, sample.answers[0]).to(self.receiver.model.device)
        contexts = reader_contexts(self.channel_text(sample), sample.receiver_context)
        student = answer_logits_from_text(self.receiver.model, tokenizer, prompt, contexts, target)
        loss = F.cross_entropy(student, target)
        if self.cfg.kl_weight > 0:
            with torch.no_grad():
                document = [sample.sharer_context, sample.receiver_context]
                teacher = answer_logits_from_text(self.teacher_model, tokenizer, prompt, document, target)
            kl = F.kl_div(
                student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            loss = loss + self.cfg.kl_weight * kl
        return loss

    def load_weights(self, directory: Path) -> None:
        self.adapter.load_weights(directory)
