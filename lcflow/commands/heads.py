"""`lcflow heads`: choose a span adapter's retrieval heads (the sharer heads whose attention selects).

    lcflow heads adapters/gemma3-to-gemma3-lcfx            print the ranking and the choice
    lcflow heads adapters/gemma3-to-gemma3-lcfx --write    and store it in adapter_config.json

Reads --train samples of a training task's *train* split with the adapter's sharer model and
ranks every attention head by how often its question attention alone selects sentences that
cover the answer (lcflow.training.heads). No weights change; the choice is stored as
`selection_heads` and used by every later handoff with this adapter. Measure the effect on
held-out samples with `lcflow bench packets` (answer recall) and `lcflow eval`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from lcflow.core.errors import UsageError
from lcflow.tasks import TASK_NAMES, get_task


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "heads",
        help="choose a span adapter's retrieval heads on training samples",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="a span-packet LCF-X adapter directory")
    p.add_argument(
        "--task", default="facts-cross", choices=TASK_NAMES, help="training task (its train split is read)"
    )
    p.add_argument("--train", type=int, default=150, help="training samples to rank heads on")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the samples")
    p.add_argument(
        "--tolerance", type=float, default=0.01, help="fewest heads within this recall of the best"
    )
    p.add_argument(
        "--write", action="store_true", help="store the choice in the adapter's adapter_config.json"
    )
    p.add_argument("--json", action="store_true", help="print the choice as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imported here, not at the top: `lcflow --help` must not import torch.
    from lcflow.adapter import AdapterConfig  # keeps --help fast
    from lcflow.provision.loading import load_model_and_tokenizer  # keeps --help fast
    from lcflow.training.heads import choose_heads  # keeps --help fast

    try:
        config = AdapterConfig.load(args.adapter)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err
    if config.mode != "lcfx" or config.packet not in ("spans", "bridge"):
        raise UsageError(
            f"{args.adapter} is not a span- or bridge-packet LCF-X adapter (packet: spans, bridge)"
        )
    if args.train < 1:
        raise UsageError(f"--train must be at least 1, not {args.train}")
    model, tokenizer = load_model_and_tokenizer(config.sharer.name, "cpu")
    samples = get_task(args.task).samples("train", args.train, seed=args.seed)
    choice = choose_heads(model, tokenizer, samples, config.slots, args.tolerance)
    if args.json:
        print(json.dumps(asdict(choice), indent=2))
    else:
        print(f"{choice.samples} {args.task} train samples, m={config.slots}: answer recall of the selection")
        print(f"  every head averaged  {choice.recall_all_heads:.3f}")
        for count, recall in choice.recall_by_count.items():
            print(f"  best {count:>2} head(s)       {recall:.3f}")
        print("best heads: " + ", ".join(f"L{t}H{h} {r:.2f}" for r, t, h in choice.ranked[:8]))
        print(f"chosen: {choice.heads} (recall {choice.recall:.3f})")
    if args.write:
        config.selection_heads = choice.heads
        config.training["selection_heads"] = {
            "task": args.task,
            "split": "train",
            "samples": choice.samples,
            "seed": args.seed,
            "recall": round(choice.recall, 4),
            "recall_all_heads": round(choice.recall_all_heads, 4),
        }
        config.save(args.adapter)
        print(f"written to {args.adapter}/adapter_config.json")
    return 0
