"""`lcflow prune`: drop receiver layers whose gate is closed and write a smaller adapter."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="remove layers whose gate is closed",
        description="Write a copy of ADAPTER without the receiver layers whose gate is at or below --min-gate; "
        "the encoder then computes and sends only the retained layers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("adapter", help="adapter directory to prune")
    p.add_argument("--min-gate", type=float, default=0.0, help="layers with gate <= this are removed")
    p.add_argument("--out", required=True, help="directory for the pruned adapter")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch  # here, not at the top: `lcflow --help` must not import torch

    from lcflow.adapter import LatentAdapter  # keeps --help fast

    adapter = LatentAdapter.from_pretrained(args.adapter)
    gates = adapter.gates()
    pruned = adapter.pruned(args.min_gate)
    if not pruned.config.retained_layers:
        raise SystemExit(
            f"every gate is <= {args.min_gate} ({gates}); nothing would be left: choose a lower --min-gate"
        )
    pruned.save_pretrained(args.out, dtype=getattr(torch, adapter.config.dtype))
    before, after = adapter.parameter_counts()["total"], pruned.parameter_counts()["total"]
    dropped = sorted(set(adapter.config.retained_layers) - set(pruned.config.retained_layers))
    print("gates: " + ", ".join(f"{t}:{g:.3f}" for t, g in gates.items()))
    print(f"removed layers {dropped}; retained {pruned.config.retained_layers}")
    print(f"parameters {before:,} -> {after:,}; written to {args.out}")
    return 0
