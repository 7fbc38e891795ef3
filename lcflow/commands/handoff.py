"""`lcflow handoff`: call a running sharer's Handoff RPC, print the answer as it streams."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lcflow.client import MODE_NAMES, HandoffClient, summary_stages
from lcflow.core.errors import UsageError
from lcflow.core.names import TEXT_CHANNELS
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.security import add_client_security_flags, client_security_from_args
from lcflow.serving.telemetry import make_tracer_provider


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "handoff",
        help="send one handoff to a running sharer",
        description="Call the sharer's Handoff RPC: the sharer reads the context, the receiver answers the prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sharer", default="127.0.0.1:50051", help="the sharer's address, HOST:PORT")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--context-file", type=Path, help="file holding the sharer's context")
    source.add_argument("--context", help="the sharer's context as text")
    source.add_argument("--session", help="id of a context the sharer already holds (OpenSession)")
    p.add_argument("--prompt", required=True, help="what the receiver is asked")
    p.add_argument("--receiver-context", default="", help="text the receiver sees on its own")
    p.add_argument(
        "--mode", choices=list(MODE_NAMES), default="lcfx", help="lcf, lcfx, c2c (the baseline), text or none"
    )
    p.add_argument(
        "--text-channel",
        choices=TEXT_CHANNELS,
        default="note",
        help="with --mode text: what the sharer sends, a one-sentence note, its whole context "
        "(forward), or the sentences an LCF-X span packet would carry (forward-selected; needs an "
        "LCF-X span or bridge adapter on the sharer, chosen as --adapter says)",
    )
    p.add_argument(
        "--text-reader",
        default="",
        metavar="NAME",
        help="with --text-channel forward or forward-selected: read the text with this text reader, a "
        "name in the receiver's --adapters (`lcflow train --mode text-reader`), not the plain receiver",
    )
    p.add_argument(
        "--adapter",
        default="",
        metavar="NAME",
        help="adapter to use, by name, from the services' --adapters (default: their --adapter when it "
        "has --mode, else their adapter of that mode with the best model-card EM; the summary says which ran)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline for the whole handoff, seconds")
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retries (by gRPC, with backoff) when the sharer is UNAVAILABLE or its queue is full (at most 4)",
    )
    add_client_security_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import grpc

    context = read_context(args.context_file) if args.context_file else (args.context or "")
    security = client_security_from_args(args)
    provider = make_tracer_provider("lcflow-client")
    client = HandoffClient(
        args.sharer, provider, timeout_s=args.timeout, security=security, retries=args.retries
    )
    summary = None
    try:
        for event in client.stream(
            args.prompt,
            mode=args.mode,
            context=context,
            session_id=args.session or "",
            receiver_context=args.receiver_context,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            adapter=args.adapter,
            text_channel=args.text_channel,
            text_reader=args.text_reader,
        ):
            if event.HasField("text"):
                print(event.text.text, end="", flush=True)
            else:
                summary = event.summary
    except grpc.RpcError as err:
        print(f"\nhandoff failed: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        provider.shutdown()
    print()
    if summary is not None:
        print(format_summary(summary))
    return 0


def read_context(path: Path) -> str:
    """The context file's text, or one line saying why it cannot be read (a user mistake, no traceback)."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"--context-file {path} {what}; give a text file holding the sharer's context")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--context-file {path} cannot be read as text: {err}") from err


def format_summary(summary) -> str:
    timings = summary.timings

    lines = [
        f"mode {pb.Mode.Name(summary.mode)}"
        + (f", adapter {summary.adapter}" if summary.adapter else "")
        + (f", receiver {summary.receiver}" if summary.receiver else "")
    ]

    stages = (*summary_stages(timings), "time_to_first_token", "total")
    lines += [f"  {name:<20} {getattr(timings, name):9.1f} ms" for name in stages if timings.HasField(name)]
    ratio = summary.bytes_raw / summary.bytes_wire if summary.bytes_wire else 0
    lines.append(
        f"  bytes raw {summary.bytes_raw}, on the wire {summary.bytes_wire} ({ratio:.2f}x), chunks {summary.chunks}"
    )
    if summary.codec:
        lines.append(f"  codec {summary.codec}: {summary.codec_reason}")
    lines.append(f"  trace {summary.trace_id}")
    return "\n".join(lines)
