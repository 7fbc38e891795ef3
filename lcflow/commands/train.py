"""`lcflow train`: train an LCF, LCF-X or C2C adapter, or a text reader, for a sharer/receiver pair.

    lcflow train --sharer A --receiver B --mode lcfx --task-file mine.jsonl --out DIR   # the whole recipe
    lcflow train --sharer A --receiver B --mode lcfx --init-adapter ALIGNED --task facts-cross-words --out DIR
    lcflow train --sharer A --receiver B --mode text-reader --channel forward-selected \
        --init-adapter LCFX_DIR --task-file mine.jsonl --out READER_DIR
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from lcflow.core.errors import UsageError
from lcflow.core.names import check_wire_form
from lcflow.tasks import load_task_file
from lcflow.training.config import TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an adapter (both LLMs frozen)",
        description="Train an adapter on a task with both LLMs frozen. Resumes from OUT/checkpoint if present.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = TrainConfig(sharer="", receiver="", out="")
    p.add_argument(
        "--sharer",
        required=True,
        help="sharer model: a name from `lcflow models list`, a local dir or a hub id",
    )
    p.add_argument("--receiver", required=True, help="receiver model (same forms as --sharer)")
    p.add_argument(
        "--out", required=True, help="adapter directory to write (checkpoints go to OUT/checkpoint)"
    )
    p.add_argument(
        "--mode",
        choices=["lcf", "lcfx", "c2c", "text-reader"],
        default=d.mode,
        help="lcf: same context; lcfx: cross context; c2c: baseline; text-reader: a LoRA reader of a "
        "text channel (--channel), trained as the LCF-X adapter is, the control LCF-X must beat",
    )
    p.add_argument(
        "--task",
        default=d.task,
        help="training task: a task, a variant or a mix (see lcflow.tasks: facts-same, facts-cross, facts-twohop, facts-cross-words, facts-mix-words, ...)",
    )
    p.add_argument(
        "--task-file",
        default=d.task_file,
        help="train on your own samples instead of --task: JSONL, one object per line with "
        "sharer_context, receiver_context, question, answers (the format `lcflow eval --task-file` "
        "reads); --validation of it is held out and written to OUT/validation.jsonl",
    )
    p.add_argument(
        "--validation",
        type=float,
        default=d.validation,
        help="with --task-file: the share of samples held out (seeded), never trained on",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (10%% warm-up, cosine decay)")
    p.add_argument(
        "--gate-lr", type=float, default=d.gate_lr, help="learning rate of the per-layer gate logits"
    )
    p.add_argument("--warmup", type=float, default=d.warmup, help="share of steps spent warming up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=d.clip, help="gradient norm clip")
    p.add_argument(
        "--gate-l1", type=float, default=d.gate_l1, help="penalty on open gates (makes layers prunable)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the data and the initial weights")
    p.add_argument("--bottleneck", type=int, default=d.bottleneck, help="latent width b")
    p.add_argument("--slots", type=int, default=d.slots, help="LCF-X slots m per layer")
    p.add_argument(
        "--receiver-aware",
        action=argparse.BooleanOptionalAction,
        default=d.receiver_aware,
        help="LCF-X: condition pooling on a digest of the receiver's context",
    )
    p.add_argument(
        "--layer-map",
        choices=["monotonic", "last_aligned"],
        default=d.layer_map,
        help="receiver->sharer layer map",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument("--device", default=d.device, help="auto (cuda if present), cpu or cuda")
    p.add_argument(
        "--packet",
        choices=["spans", "slots"],
        default=d.packet,
        help="--mode lcfx without --init-adapter: spans runs the span recipe in one command (the closed-form "
        "alignment, OUT/init; the sharer's retrieval heads chosen on training samples; the distillation), "
        "each step resumable; slots trains the pooled slot packet from scratch (docs/lcfx.md: not readable)",
    )
    p.add_argument(
        "--init-adapter",
        default=d.init_adapter,
        help="LCF-X span packet: refine this adapter (from `lcflow align --adapter-out`) by distillation; "
        "text-reader with --channel forward-selected: the LCF-X adapter whose selection is forwarded",
    )
    p.add_argument(
        "--channel",
        choices=["forward-selected", "forward"],
        default=d.channel,
        help="text-reader: what it reads, the sentences the LCF-X adapter selects or the whole document",
    )
    p.add_argument("--rank", type=int, default=d.rank, help="text-reader: LoRA rank r (alpha = 2r)")
    p.add_argument(
        "--init-reader",
        default=d.init_reader,
        metavar="DIR",
        help="text-reader: start from this trained reader (same --channel and --rank) instead of "
        "an untrained LoRA, e.g. to give it the same further training as an LCF-X adapter refined "
        "with --init-adapter",
    )
    p.add_argument(
        "--kl-weight",
        type=float,
        default=d.kl_weight,
        help="with --init-adapter: weight of KL(teacher reading the text || student) beside the answer CE",
    )
    p.add_argument(
        "--teacher-adapter",
        default=d.teacher_adapter,
        metavar="DIR",
        help="with --init-adapter: the KL's teacher is the receiver reading this span adapter's packet "
        "instead of the document (distil a narrow --bottleneck adapter from a full-width one)",
    )
    p.add_argument(
        "--contrast-weight",
        type=float,
        default=d.contrast_weight,
        help="with --init-adapter: weight of the hinge max(0, margin + CE(right packet) - CE(another "
        "sample's packet)), which rewards answers that depend on the packet (0 = off)",
    )
    p.add_argument(
        "--receiver-lora",
        type=int,
        default=d.receiver_lora,
        metavar="RANK",
        help="with --init-adapter: also train a LoRA of this rank on the receiver beside the decoder "
        "(the capacity a text reader has), saved in OUT/receiver-reader; `lcflow eval` reads the "
        "packet through it; 0 = the decoder alone",
    )
    p.add_argument(
        "--contrast-margin",
        type=float,
        default=d.contrast_margin,
        help="with --contrast-weight: how many nats better the right packet must explain the answer",
    )
    p.add_argument(
        "--wire",
        type=check_wire_form,
        default=d.wire,
        help="the latents' number format on the way to the receiver while training: exact (as "
        "encoded), or a wire codec (bf16, int8, int4, int4-hadamard, or an int4 one with its group size: "
        "int4-hadamard-g32) with a straight-through gradient, so the decoder "
        "learns to read what the services send (e.g. refine a shipped adapter for --quantize int4)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    check_inputs(cfg)
    if cfg.mode == "text-reader":
        from lcflow.training.reader import ReaderTrainer  # keeps --help fast

        out = ReaderTrainer(cfg).run()
    elif cfg.mode == "c2c":
        from lcflow.training.c2c import train_c2c  # keeps --help fast

        out = train_c2c(cfg)
    elif cfg.init_adapter:
        from lcflow.training.distill import SpanDistillTrainer  # keeps --help fast

        out = SpanDistillTrainer(cfg).run()
    elif cfg.mode == "lcfx" and cfg.packet == "spans":
        from lcflow.training.lcfx_recipe import train_lcfx  # keeps --help fast

        try:
            out = train_lcfx(cfg)
        except ValueError as err:
            raise UsageError(str(err)) from err
    else:
        from lcflow.training.train import Trainer  # keeps --help fast

        out = Trainer(cfg).run()
    print(f"adapter written to {out}")
    return 0


def check_inputs(cfg: TrainConfig) -> None:
    """Refuse a bad task file or setting in one message before any model loads."""
    from pathlib import Path

    if not 0 <= cfg.validation < 1:
        raise UsageError(
            f"--validation is the share of --task-file held out, in [0, 1); got {cfg.validation}"
        )
    if cfg.teacher_adapter and not (cfg.init_adapter and cfg.mode == "lcfx"):
        raise UsageError(
            "--teacher-adapter distils an LCF-X span adapter: give --mode lcfx --init-adapter DIR too"
        )
    if cfg.teacher_adapter and not Path(cfg.teacher_adapter).is_dir():
        raise UsageError(
            f"--teacher-adapter {cfg.teacher_adapter} is not a directory; give an adapter directory"
        )
    if cfg.receiver_lora and not (cfg.init_adapter and cfg.mode == "lcfx"):
        raise UsageError(
            "--receiver-lora trains beside a span adapter: give --mode lcfx --init-adapter DIR too"
        )
    if cfg.receiver_lora < 0:
        raise UsageError(f"--receiver-lora is a LoRA rank (0 = none), not {cfg.receiver_lora}")
    if cfg.init_reader and cfg.mode != "text-reader":
        raise UsageError("--init-reader starts a text reader: give --mode text-reader too")
    if cfg.init_reader and not Path(cfg.init_reader, "reader_config.json").is_file():
        raise UsageError(
            f"--init-reader {cfg.init_reader} is not a text reader's directory (no reader_config.json)"
        )
    if cfg.task_file:
        if not Path(cfg.task_file).is_file():
            raise UsageError(f"--task-file {cfg.task_file} does not exist; give a JSONL file of samples")
        try:
            load_task_file(cfg.task_file)
        except ValueError as err:
            raise UsageError(str(err)) from err
