"""Training an adapter: both LLMs frozen, cross-entropy on the answer tokens only.

One step = `batch_size` samples, each run through the same path as inference
(sharer prefill -> encode -> receiver prepare), then the answer tokens are fed on top of
the prepared cache and only their logits are computed (`logits_to_keep`): a 262k-vocabulary
head over every prompt position would cost more than the rest of the step.

AdamW (lr 1e-4, 10% linear warm-up then cosine decay, weight decay 0.01, clip 1.0), as C2C.
Gate logits learn at `gate_lr` (1e-2): at 1e-4 a gate would move by ~0.03 in 300 steps and no
layer could ever close, so pruning would have nothing to prune. Seeded and resumable: a
checkpoint holds the adapter, the optimiser, the scheduler, the step and the loss history.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from lcflow.adapter import LatentAdapter
from lcflow.core.kv import model_identity
from lcflow.eval.harness import through_the_wire
from lcflow.handoff.pair import Latents, PreparedInput, Receiver, Sharer, receiver_view
from lcflow.provision import load_model_and_tokenizer
from lcflow.tasks import format_question_prompt, get_task, load_task_file
from lcflow.training.config import TrainConfig
from lcflow.training.own_answers import OWN_ANSWERS, with_own_answers

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"


def answer_ids(tokenizer, answer: str) -> torch.Tensor:
    """The target: the answer's tokens followed by end-of-sequence, so the receiver learns to stop.

    With a chat template the answer opens the assistant's turn; without one it continues the
    prompt's last line ("Answer:"), where the natural next token carries a leading space."""
    text = answer if getattr(tokenizer, "chat_template", None) else " " + answer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.long)


def through_the_wire_straight(latents: Latents, wire: str) -> Latents:
    """The latents as the receiver would get them over a `wire` codec (evaluation.through_the_wire),
    with the identity's gradient (straight-through): forward wire(z) + (z - z) = wire(z) exactly,
    backward dz."""
    if wire == "exact":
        return latents

    received = Latents(latents.mode, {layer: z.detach() for layer, z in latents.layers.items()})
    through_the_wire(received, wire)  # replaces each layer, leaving the encoder's tensors alone
    for layer, z in latents.layers.items():
        latents.layers[layer] = received.layers[layer] + (z - z.detach())
    return latents


def prepare_for_sample(
    sharer: Sharer, receiver: Receiver, mode: str, sample, prompt: str, packet_from=None, wire: str = "exact"
):
    """The handoff up to the receiver's cache, with gradients through the adapter.

    `packet_from` (LCF-X only): another sample whose sharer's packet arrives instead of this
    sample's, the control a packet that carries knowledge must beat (as `lcfx-wrong` in eval).
    `wire`: the latents' number format on the way (through_the_wire_straight)."""
    if mode == "lcf":
        latents = through_the_wire_straight(sharer.encode(sharer.prefill(sample.sharer_context)), wire)
        return receiver.prepare_lcf(latents, sample.sharer_context, prompt)
    if mode == "lcfx":
        source = packet_from or sample
        source_prompt = (
            prompt if packet_from is None else format_question_prompt(source, include_context=False)
        )
        latents = sharer.encode(
            sharer.prefill(source.sharer_context),
            receiver_text=receiver_view(source.receiver_context, source_prompt),
            question=source_prompt,
        )
        return receiver.prepare_lcfx(
            through_the_wire_straight(latents, wire), prompt, sample.receiver_context
        )
    raise ValueError(f"training mode {mode!r} is not handled here")


def answer_loss(receiver: Receiver, prepared, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the prepared (fused) cache."""
    model = receiver.model
    tail = torch.cat([prepared.input_ids[:, -1:], target[None, :-1]], dim=1).to(model.device)
    out = model(input_ids=tail, past_key_values=prepared.cache, use_cache=True, logits_to_keep=len(target))
    return F.cross_entropy(out.logits[0].float(), target.to(model.device))


def cosine_with_warmup(step: int, total: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(adapter, cfg: TrainConfig, extra: list | None = None):
    """AdamW over the adapter (gate logits at their own rate) and `extra` parameters trained
    beside it (a receiver-side LoRA)."""
    gates = [p for n, p in adapter.named_parameters() if n.endswith("logit")]
    rest = [p for n, p in adapter.named_parameters() if not n.endswith("logit")] + list(extra or [])
    return torch.optim.AdamW(
        [
            {"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": gates, "lr": cfg.gate_lr, "weight_decay": 0.0},
        ]
    )


def save_loss_curve(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.35, label="loss per step")
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    ax.plot(range(1, len(losses) + 1), smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Trainer:
    """Holds the two frozen models, the adapter and the optimiser; `run()` trains to cfg.steps.

    A subclass trains another kind of adapter (lcflow.training.c2c) by overriding
    `adapter_class`, `build_adapter`, `prepare` and `gate_penalty`; the step, the schedule and
    the checkpoint/resume/loss-curve files stay the same.
    """

    adapter_class = LatentAdapter  # what `resume` loads the checkpointed weights with

    def __init__(self, cfg: TrainConfig, sharer_pair=None, receiver_pair=None):

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.format_prompt = format_question_prompt
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        (ms, ts), (mr, tr) = (
            sharer_pair or _load(cfg.sharer, cfg.device),
            receiver_pair or _load(cfg.receiver, cfg.device),
        )
        self.adapter = self.build_adapter((ms, ts), (mr, tr))
        self.samples, self.data = training_samples(cfg)
        if any(sample.open_ended for sample in self.samples):  # open prompts: the receiver's own answers
            self.samples = with_own_answers(self.samples, Receiver(mr, tr), self.out / OWN_ANSWERS)
        self.optimizer = build_optimizer(self.adapter, cfg, self.extra_parameters())
        warmup_steps = max(1, int(cfg.warmup * cfg.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, cfg.steps, warmup_steps)
        )
        self.step = 0
        self.losses: list[float] = []
        self.seconds = 0.0

    # --- what a subclass changes -------------------------------------------------------------

    def build_adapter(self, sharer_pair: tuple, receiver_pair: tuple):
        """A fresh adapter on the receiver's device; sets `self.sharer` and `self.receiver`."""
        (ms, ts), (mr, tr) = sharer_pair, receiver_pair
        adapter = LatentAdapter.for_models(
            self.cfg.mode,
            model_identity(ms, ts, name=self.cfg.sharer),
            model_identity(mr, tr, name=self.cfg.receiver),
            layer_map_strategy=self.cfg.layer_map,
            bottleneck=self.cfg.bottleneck,
            slots=self.cfg.slots,
            receiver_aware=self.cfg.receiver_aware,
        ).to(mr.device)
        self.sharer = Sharer(ms, ts, adapter.encoder, adapter.config)
        self.receiver = Receiver(mr, tr, adapter.decoder, adapter.config)
        return adapter

    def extra_parameters(self) -> list:
        """Parameters trained beside the adapter's (none here)."""
        return []

    def prepare(self, sample) -> PreparedInput:
        """The receiver's cache for one sample, with gradients through the adapter."""
        prompt = self.format_prompt(sample, include_context=False)
        return prepare_for_sample(
            self.sharer, self.receiver, self.cfg.mode, sample, prompt, wire=self.cfg.wire
        )

    def gate_penalty(self) -> torch.Tensor:
        """Mean openness of the layer gates, the term `gate_l1` weighs."""
        return torch.stack([self.adapter.decoder.gate(t) for t in self.adapter.decoder.layers]).mean()

    # --- one step ----------------------------------------------------------------------------

    def sample_loss(self, sample) -> torch.Tensor:
        target = answer_ids(self.receiver.tokenizer, sample.answers[0])
        return answer_loss(self.receiver, self.prepare(sample), target)

    def train_step(self) -> float:
        self.adapter.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.samples[self.step * self.cfg.batch_size : (self.step + 1) * self.cfg.batch_size]
        total = 0.0
        for sample in batch:
            loss = self.sample_loss(sample)
            if self.cfg.gate_l1 > 0:
                loss = loss + self.cfg.gate_l1 * self.gate_penalty()
            (loss / len(batch)).backward()
            total += loss.item() / len(batch)
        torch.nn.utils.clip_grad_norm_([*self.adapter.parameters(), *self.extra_parameters()], self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.losses.append(total)
        return total

    @torch.no_grad()
    def evaluate_loss(self, samples) -> float:
        """Mean answer cross-entropy over `samples` with the current adapter (no update)."""
        self.adapter.eval()
        losses = [self.sample_loss(sample).item() for sample in samples]
        return sum(losses) / len(losses)

    def run(self) -> Path:
        self.resume()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.cfg.mode}", unit="step")
        while self.step < self.cfg.steps:
            start = time.perf_counter()
            loss = self.train_step()
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            bar.set_postfix(loss=f"{loss:.3f}", s_per_step=f"{elapsed:.2f}")
            bar.update(1)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save_checkpoint()
        bar.close()
        return self.save_final()

    # --- files -------------------------------------------------------------------------------

    def provenance(self) -> dict:
        return {
            **{k: v for k, v in asdict(self.cfg).items() if k not in ("out", "device")},
            "steps_done": self.step,
            "train_seconds": round(self.seconds, 1),
            "seconds_per_step": round(self.seconds / max(1, self.step), 3),
            "final_loss_mean_last_10": round(sum(self.losses[-10:]) / max(1, len(self.losses[-10:])), 4),
            "first_loss_mean_first_10": round(sum(self.losses[:10]) / max(1, len(self.losses[:10])), 4),
            **self.data,
        }

    def save_checkpoint(self) -> None:
        directory = self.out / CHECKPOINT_DIR
        self.adapter.config.training = self.provenance()
        self.adapter.save_pretrained(directory, dtype=torch.float32)
        state = {
            "step": self.step,
            "losses": self.losses,
            "seconds": self.seconds,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # Dropout and Gumbel noise on a GPU draw from its own generator.
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": asdict(self.cfg),
        }
        tmp = directory / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(directory / STATE_FILE)  # a checkpoint is either whole or absent
        save_loss_curve(self.losses, self.out / "loss_curve.png", f"{self.cfg.mode} {self.cfg.task}")

    def resume(self) -> None:
        path = self.out / CHECKPOINT_DIR / STATE_FILE
        if not path.is_file():
            return
        state = torch.load(path, weights_only=True)  # our own file; weights_only refuses arbitrary objects
        saved = {
            k: v
            for k, v in state["config"].items()
            if k not in ("steps", "out", "device", "checkpoint_every")
        }
        current = {k: v for k, v in asdict(self.cfg).items() if k in saved}
        if saved != current:
            raise ValueError(
                f"{path} was written by a run with other settings ({saved}); "
                "use another --out directory or the same settings to resume"
            )
        self.load_weights(self.out / CHECKPOINT_DIR)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        cuda_rng = state.get("cuda_rng", [])
        if cuda_rng and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.step, self.losses, self.seconds = state["step"], state["losses"], state["seconds"]
        log.info("resumed from %s at step %d", path, self.step)

    def load_weights(self, directory: Path) -> None:
        """Put a checkpoint's adapter weights into `self.adapter` (a subclass's adapter may store
        them otherwise)."""
        self.adapter.load_state_dict(self.adapter_class.from_pretrained(directory).state_dict())

    def save_final(self) -> Path:
        self.adapter.config.training = self.provenance()
        self.adapter.save_pretrained(self.out, dtype=torch.float32)
        (self.out / "train_log.json").write_text(
            json.dumps({"losses": self.losses, **self.provenance()}, indent=1)
        )
        return self.out


def training_samples(cfg: TrainConfig) -> tuple[list, dict]:
    """(the cfg.steps * cfg.batch_size samples the steps take in order, what provenance records).

    A built-in task draws that many fresh samples from its train split. A task file (the user's
    own) is shuffled with the seed and split: `cfg.validation` of it is held out (never trained
    on; `lcflow eval --task-file OUT/validation.jsonl` scores it), the rest is cycled through in
    epochs. The split is written to OUT/split.json and OUT/validation.jsonl."""
    needed = cfg.steps * cfg.batch_size
    if not cfg.task_file:
        return get_task(cfg.task).samples("train", needed, seed=cfg.seed), {}

    samples = load_task_file(cfg.task_file)
    if not 0 <= cfg.validation < 1:
        raise ValueError(f"--validation is the share held out, in [0, 1); got {cfg.validation}")
    order = list(range(len(samples)))
    random.Random(cfg.seed).shuffle(order)
    held = round(len(samples) * cfg.validation)
    if len(samples) - held < 1:
        raise ValueError(
            f"{cfg.task_file} has {len(samples)} sample(s): none left to train on after validation"
        )
    validation = [samples[i] for i in order[:held]]
    train = [samples[i] for i in order[held:]]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    split = {"task_file": str(cfg.task_file), "seed": cfg.seed, "train": [s.id for s in train]}
    split["validation"] = [s.id for s in validation]
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    (out / "validation.jsonl").write_text("".join(json.dumps(s.to_dict()) + "\n" for s in validation))
    record = {"task_file_samples": len(samples), "train_samples": len(train), "validation_samples": held}
    record["epochs"] = round(needed / len(train), 2)
    return [train[i % len(train)] for i in range(needed)], record


def _load(name: str, device: str):

    return load_model_and_tokenizer(name, device=device)
