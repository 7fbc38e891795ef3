"""`lcflow adapters`: list a running service's adapters (its ListAdapters RPC) as a table."""

from __future__ import annotations

import argparse

from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.security import add_client_security_flags, client_security_from_args

COLUMNS = ("", "name", "mode", "sharer", "receiver", "params", "size", "card EM (task)", "loaded", "usable")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "adapters",
        help="list the adapters of a running sharer or receiver",
        description="Call a service's ListAdapters RPC and print its adapters: name, mode, the sharer "
        "and receiver models each was made for (name@hash), parameters, size on disk, the model card's "
        "EM, whether it is loaded, and whether this service can use it (else why not). '*' marks the "
        "default (--adapter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sharer", default="", metavar="HOST:PORT", help="a sharer's address")
    p.add_argument("--receiver", default="", metavar="HOST:PORT", help="a receiver's address")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    add_client_security_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    targets = [(role, getattr(args, role)) for role in ("sharer", "receiver") if getattr(args, role)]
    security = client_security_from_args(args)
    for i, (role, target) in enumerate(targets or [("sharer", "127.0.0.1:50051")]):
        if i:
            print()
        print(format_listing(list_adapters(role, target, security, args.timeout), target))
    return 0


def list_adapters(role: str, target: str, security, timeout_s: float):
    """The ListAdaptersResponse of the `role` service at `target`."""

    channel = security.channel(target)
    try:
        stub = pb_grpc.SharerStub(channel) if role == "sharer" else pb_grpc.ReceiverStub(channel)
        return stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout_s)
    finally:
        channel.close()


def model_text(model) -> str:
    """name@hash: a local directory by its last part, the hash cut to 8 digits of the config's
    and 8 of the tokenizer's."""
    if not model.name and not model.hash:
        return "-"
    name = model.name.rstrip("/").rpartition("/")[2] if model.name.startswith(("/", ".", "~")) else model.name
    config, _, tokenizer = model.hash.partition(".")
    return f"{name}@{config[:8]}.{tokenizer[:8]}" if model.hash else name


def size_text(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def format_listing(response, target: str) -> str:
    """The table `lcflow adapters` prints for one service."""
    lines = [
        f"{response.role} {target}: model {model_text(response.model)}, "
        f"default adapter {response.default_adapter or '(none)'}, {len(response.adapters)} adapter(s), "
        f"loaded {size_text(response.memory_used_bytes)} of {size_text(response.memory_limit_bytes)}"
    ]
    rows = [
        (
            "*" if info.is_default else "",
            info.name,
            info.mode or "?",
            model_text(info.sharer),
            model_text(info.receiver),
            f"{info.parameters:,}",
            size_text(info.size_bytes),
            f"{info.card_em:.3f} ({info.card_task or '?'})" if info.HasField("card_em") else "-",
            "yes" if info.loaded else "no",
            "yes" if info.usable else f"no: {info.reason}",
        )
        for info in response.adapters
    ]
    if not rows:
        lines.append("  no adapters: this service serves TEXT and NONE only")
        return "\n".join(lines)
    # the last column (usable, with its reason) is not padded: it may be long
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS) - 1)]
    for row in [COLUMNS, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append(" " + " ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
