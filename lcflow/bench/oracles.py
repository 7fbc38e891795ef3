"""`lcflow bench oracles`: the oracle ladder, which packets a receiver can read at all.

    lcflow bench oracles --pair smollm2-to-gemma3 --task facts-cross --n 60 \\
        --alignment runs/align-smollm2-to-gemma3 --out runs/oracles-cross

Every rung (lcflow.research.oracles) runs on the same held-out samples; EM with a 95% CI,
F1, "contains the answer" and the answer's NLL are reported per rung, with the packet's
length. `xlat-*` rungs need a dense alignment (`lcflow align`); without --alignment they are
skipped, and the report says so. Nothing is trained here.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from lcflow.bench.samples import add_sample_flags, samples_from_flags, samples_label
from lcflow.core.names import DEFAULT_RUNGS, PAIRS


def register(subparsers) -> None:

    p = subparsers.add_parser(
        "oracles",
        help="the oracle ladder: which KV packets a receiver can read, before any training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pair", default="smollm2-to-gemma3", choices=sorted(PAIRS), help="sharer/receiver pair")
    add_sample_flags(p, n_default=60)
    p.add_argument("--rungs", nargs="+", default=list(DEFAULT_RUNGS), help="rungs to run, in order")
    p.add_argument("--alignment", help="a dense alignment directory (`lcflow align`) for the xlat rungs")
    p.add_argument("--max-new-tokens", type=int, default=8, help="longest answer, in tokens")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--out", help="directory for results.json and results.md")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch  # here, not at the top: `lcflow --help` must not import torch

    from lcflow.handoff.generation import GenerationSettings  # keeps --help fast
    from lcflow.packets.alignment import KVAlignment  # keeps --help fast
    from lcflow.provision.loading import load_pair  # keeps --help fast
    from lcflow.research.oracles import (  # keeps --help fast
        OracleModels,
        markdown_table,
        run_ladder,
        summarize,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    rungs, skipped = list(args.rungs), {}
    alignment = KVAlignment.from_pretrained(args.alignment) if args.alignment else None
    if alignment is None:
        skipped = {r: "needs --alignment" for r in rungs if r.startswith("xlat")}
        rungs = [r for r in rungs if r not in skipped]
    samples = samples_from_flags(args)
    sharer_name, receiver_name = PAIRS[args.pair]
    sharer, receiver = load_pair(sharer_name, receiver_name, "cpu")
    models = OracleModels(sharer, receiver, alignment)
    outcomes = run_ladder(rungs, models, samples, GenerationSettings(max_new_tokens=args.max_new_tokens))
    rows = summarize(outcomes)
    table = markdown_table(rows)
    print(table)
    for rung, why in skipped.items():
        print(f"skipped {rung}: {why}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "pair": args.pair,
            "task": samples_label(args),
            "n": len(samples),
            "alignment": args.alignment,
            "max_new_tokens": args.max_new_tokens,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
            "skipped": skipped,
        }
        records = [o.__dict__ for o in outcomes]
        (out / "results.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "samples": records}, indent=2)
        )
        (out / "results.md").write_text(
            f"# Oracle ladder: {args.pair}, {meta['task']}, n={len(samples)}\n\n{table}\n"
        )
    return 0
