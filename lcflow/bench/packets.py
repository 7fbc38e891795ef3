"""`lcflow bench packets`: is a span-packet LCF-X adapter's packet about its document, and read?

    lcflow bench packets --adapter adapters/gemma3-to-gemma3-lcfx --task facts-cross --n 40

On held-out samples (lcflow.research.diagnostics): the share of the packet's variance
that lies between samples, per receiver layer; the attention the receiver's last prompt token
puts on the packet; and the answer's NLL, each with the sample's own packet and with another
sample's. The models are the ones the adapter's config names (`lcflow models list`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from lcflow.bench.samples import add_sample_flags, samples_from_flags, samples_label


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "packets",
        help="packet diagnostics of a span-packet LCF-X adapter: variance between samples, attention, NLL",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, help="a span-packet LCF-X adapter directory")
    add_sample_flags(p, n_default=40)
    p.add_argument("--out", help="directory for diagnostics.json and diagnostics.md")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch  # here, not at the top: `lcflow --help` must not import torch

    from lcflow.adapter import AdapterConfig, LatentAdapter  # keeps --help fast
    from lcflow.adapter.card import diagnostics_markdown as markdown  # keeps --help fast
    from lcflow.core.kv import model_identity  # keeps --help fast
    from lcflow.handoff.pair import Receiver, Sharer  # keeps --help fast
    from lcflow.provision.loading import load_pair  # keeps --help fast
    from lcflow.research.diagnostics import diagnose  # keeps --help fast

    try:
        config = AdapterConfig.load(args.adapter)
    except (FileNotFoundError, ValueError) as err:
        print(f"lcflow bench packets: {err}", file=sys.stderr)
        return 2
    if config.mode != "lcfx" or config.packet != "spans":
        print(f"lcflow bench packets: {args.adapter} is not a span-packet LCF-X adapter", file=sys.stderr)
        return 2
    samples = samples_from_flags(args)
    sharer_pair, receiver_pair = load_pair(config.sharer.name, config.receiver.name, "cpu")
    adapter = LatentAdapter.from_pretrained(
        args.adapter,
        sharer=model_identity(*sharer_pair, name=config.sharer.name),
        receiver=model_identity(*receiver_pair, name=config.receiver.name),
    )
    try:
        found = diagnose(
            Sharer(*sharer_pair, adapter.encoder, adapter.config),
            Receiver(*receiver_pair, adapter.decoder, adapter.config),
            samples,
        )
    except ValueError as err:
        print(f"lcflow bench packets: {err}", file=sys.stderr)
        return 2
    table = markdown(found["summary"])
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        found["meta"] = {
            "adapter": str(args.adapter),
            "task": samples_label(args),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, cpu",
        }
        (out / "diagnostics.json").write_text(json.dumps(found, indent=1))
        (out / "diagnostics.md").write_text(table + "\n")
        print(f"written: {out / 'diagnostics.json'}, {out / 'diagnostics.md'}")
    return 0
