"""The `lcflow` command line: one sub-command per module, each module registers its own flags.

Every command module exposes `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed args, returns an exit code). Keeping the flags next to the code
they configure means `lcflow <command> --help` always tells the truth.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lcflow.core.errors import UsageError  # noqa: F401 (raised by the commands; `lcflow.cli.UsageError` for callers)
from lcflow.provision import ProvisionError
from lcflow.serving.security import SecurityConfigError

# Sub-command modules, in the order `lcflow --help` lists them.
COMMAND_MODULES = [
    "lcflow.commands.demo",
    "lcflow.commands.handoff",
    "lcflow.commands.adapters",
    "lcflow.commands.serve",
    "lcflow.commands.train",
    "lcflow.commands.prune",
    "lcflow.commands.align",
    "lcflow.commands.compress",
    "lcflow.commands.heads",
    "lcflow.commands.bridge",
    "lcflow.commands.info",
    "lcflow.commands.eval",
    "lcflow.commands.models",
    "lcflow.commands.bench",
    "lcflow.commands.certs",
]


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "you gave me something I cannot use", not a bug."""

    return UsageError, SecurityConfigError, ProvisionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcflow",
        description="Latent Cache Flow: hand a sharer model's compressed KV cache to a receiver model.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of a user mistake (a bad flag, a missing file)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not a command that is not written yet
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        if args.debug:
            raise
        print(f"lcflow {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # A failed RPC (service down, TLS refused, no token) is the service's answer, not a bug here:
        # its status and details say what happened; --debug shows where.
        import grpc

        if args.debug or not isinstance(err, grpc.RpcError) or not hasattr(err, "code"):
            raise
        print(f"lcflow {args.command}: the call failed: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
