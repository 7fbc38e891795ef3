"""`lcflow compress`: narrow a full-width span adapter's packet to b numbers a row, in closed form.

    lcflow compress adapters/gemma3-to-gemma3-lcfx --bottleneck 128 --out runs/lcfx-b128
    lcflow compress adapters/gemma3-to-gemma3-lcfx --bottleneck 64 128 256 --out runs/lcfx
        # several widths from one pass over the samples: runs/lcfx/b64, runs/lcfx/b128, ...
    lcflow train ... --mode lcfx --init-adapter runs/lcfx-b128 --bottleneck 128 \\
        --teacher-adapter adapters/gemma3-to-gemma3-lcfx        # then distil it (optional)

Runs the adapter's sharer half over --samples training samples as a handoff does and keeps, per
receiver layer, the --bottleneck directions that carry most of the K/V its packets give the
receiver (keys and values weighted alike; lcflow.packets.narrowing); with --metric receiver, the
directions that matter most to the receiver itself (its queries, its output projection). The
sharer then sends b numbers a row instead of the full width: fewer bytes on the wire before any
codec. Selection, heads and slots stay the adapter's. No backward pass; prints the share of the
K/V's variance kept per layer (whichever metric chose the directions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcflow.core.errors import UsageError
from lcflow.tasks import TASK_NAMES, VARIANTS, get_task


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress",
        help="narrow a span adapter's packet to --bottleneck numbers a row (closed form)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="a full-width span-packet LCF-X adapter directory")
    p.add_argument(
        "--bottleneck",
        type=int,
        nargs="+",
        required=True,
        help="b: numbers a packet row carries per layer; several widths share one pass over the samples",
    )
    p.add_argument(
        "--out", required=True, help="directory for the narrowed adapter (several widths: OUT/b<width> each)"
    )
    p.add_argument(
        "--task",
        default="facts-cross-words",
        choices=TASK_NAMES + tuple(VARIANTS),
        help="task whose train split supplies the packets the directions are fitted on",
    )
    p.add_argument("--samples", type=int, default=200, help="training samples to collect packet rows from")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the samples")
    p.add_argument(
        "--no-balance",
        action="store_true",
        help="fit the directions to the raw K/V (keys' outlier channels then dominate) instead of "
        "weighting keys and values alike",
    )
    p.add_argument(
        "--metric",
        choices=("variance", "receiver"),
        default="variance",
        help="what a lost direction costs: 'variance', its share of the K/V's variance (keys and values "
        "then counted alike unless --no-balance); 'receiver', what it costs the receiver: keys as its "
        "queries over the samples' prompts read them, values through its output projection "
        "(lcflow.packets.narrowing.receiver_metric; loads the receiver and runs it over the samples)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    # Imported here, not at the top: `lcflow --help` must not import torch.
    import torch

    from lcflow.adapter import LatentAdapter  # keeps --help fast
    from lcflow.provision.loading import load_model_and_tokenizer, load_pair  # keeps --help fast
    from lcflow.training.narrow import narrowed_adapter, packet_rows, receiver_metrics  # keeps --help fast

    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1, not {args.samples}")
    if args.no_balance and args.metric == "receiver":
        raise UsageError(
            "--no-balance cannot go with --metric receiver: its keys (logits) and values (outputs) are "
            "in different units until they are counted alike; drop --no-balance"
        )
    try:
        teacher = LatentAdapter.from_pretrained(args.adapter)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    config = teacher.config
    if config.mode != "lcfx" or config.packet != "spans":
        raise UsageError(f"{args.adapter} is not a span-packet LCF-X adapter; only those can be narrowed")
    too_wide = [b for b in args.bottleneck if not 0 < b < config.bottleneck]
    if too_wide:
        raise UsageError(
            f"--bottleneck must be between 1 and the adapter's width minus one ({config.bottleneck - 1}), "
            f"not {', '.join(map(str, too_wide))}"
        )
    if args.metric == "receiver":  # the receiver runs only for its metric
        sharer, receiver = load_pair(config.sharer.name, config.receiver.name, "cpu")
    else:
        sharer = load_model_and_tokenizer(config.sharer.name, "cpu")
    samples = get_task(args.task).samples("train", args.samples, seed=args.seed)
    rows = packet_rows(teacher, sharer, samples)
    metrics = receiver_metrics(receiver, samples, config.slots) if args.metric == "receiver" else None
    for width in args.bottleneck:
        out = Path(args.out) if len(args.bottleneck) == 1 else Path(args.out, f"b{width}")
        student, kept = narrowed_adapter(teacher, rows, width, not args.no_balance, metrics)
        student.config.training = {
            "method": f"closed-form narrowing of {args.adapter} to b={width} "
            f"({'raw K/V' if args.no_balance else 'keys and values weighted alike'}, "
            f"{args.metric} metric), no task training",
            "metric": args.metric,
            "narrowed_from": args.adapter,
            "teacher_training": config.training,
            "task": args.task,
            "split": "train",
            "samples": len(samples),
            "seed": args.seed,
            "variance_kept_k_v": {str(t): list(v) for t, v in kept.items()},
        }
        student.save_pretrained(out, dtype=getattr(torch, config.dtype))
        mean_k = sum(k for k, _ in kept.values()) / len(kept)
        mean_v = sum(v for _, v in kept.values()) / len(kept)
        print(
            f"b={width}: variance kept per layer (keys / values): "
            + ", ".join(f"{t}:{k:.3f}/{v:.3f}" for t, (k, v) in kept.items())
        )
        print(f"b={width}: mean kept: keys {mean_k:.3f}, values {mean_v:.3f}; written to {out}")
    return 0
