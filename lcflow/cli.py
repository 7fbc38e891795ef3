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

# Sub-command modules, in the order `lcflow --help` lists them.
COMMAND_MODULES = [
    "lcflow.commands.demo",
    "lcflow.commands.handoff",
    "lcflow.commands.serve",
    "lcflow.commands.train",
    "lcflow.commands.prune",
    "lcflow.commands.align",
    "lcflow.commands.info",
    "lcflow.commands.eval",
    "lcflow.commands.models",
    "lcflow.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcflow",
        description="Latent Cache Flow: hand a sharer model's compressed KV cache to a receiver model.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
