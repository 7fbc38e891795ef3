"""`lcflow bench`: measurements, one sub-command per module in lcflow.bench.

To add a benchmark, write lcflow/bench/<name>.py with `register(subparsers)` (adds its parser
and sets `func`) and list it in BENCH_MODULES.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = [
    "lcflow.bench.load",
    "lcflow.bench.transport",
    "lcflow.bench.latency",
    "lcflow.bench.oracles",
    "lcflow.bench.packets",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput and latency",
        description="Benchmarks; each prints a table and can write JSON with --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not a benchmark that is not written yet
                raise
            continue
        module.register(benches)

    def show_help(args) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
