"""Ship a text reader into adapters/: a trained run (weights in bf16, with its training log and
loss curve), or a copy of a shipped reader for a second pair with the same receiver.

    python scripts/ship_reader.py RUN_DIR ADAPTER_DIR RECEIVER_MODEL
    python scripts/ship_reader.py --copy SHIPPED_READER ADAPTER_DIR --selection LCFX_ADAPTER --why TEXT

A copy is how a reader gets the same budget as an LCF-X adapter whose own reader was copied from
another pair (a bridge adapter carries the Gemma3 LCF-X adapter's reader, with no task training
of its own): the text reader is the one trained alongside that reader, and reads the sentences
the pair's own adapter selects. `training.copied_from` records where the weights came from.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lcflow.adapter.card import CARD_FILES
from lcflow.adapter.reader import READER_CONFIG, TextReader
from lcflow.provision import load_model_and_tokenizer


def ship_trained(source: Path, target: Path, receiver: str) -> None:
    model, tokenizer = load_model_and_tokenizer(receiver, device="cpu")
    reader = TextReader.from_pretrained(source, model, tokenizer, name=receiver, merge=False)
    reader.save_pretrained(target, dtype=torch.bfloat16)
    for name in ("train_log.json", "loss_curve.png"):
        shutil.copy(source / name, target / name)


def ship_copy(source: Path, target: Path, selection: str, why: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():  # the card is written anew from its eval
        if path.name not in CARD_FILES:
            shutil.copy(path, target / path.name)
    config = json.loads((source / READER_CONFIG).read_text())
    if config["channel"] == "forward-selected":
        config["selection_adapter"] = selection
    config["training"] = {**config["training"], "copied_from": str(source), "copy_reason": why}
    (target / READER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", type=Path, help="a training run's directory, or with --copy a shipped reader"
    )
    parser.add_argument("target", type=Path, help="the adapter directory to write")
    parser.add_argument("receiver", nargs="?", help="the receiver model's name (a trained run only)")
    parser.add_argument("--copy", action="store_true", help="copy a shipped reader for another pair")
    parser.add_argument(
        "--selection", default="", help="with --copy: the pair's LCF-X adapter (forward-selected)"
    )
    parser.add_argument(
        "--why", default="", help="with --copy: why a copy is the fair budget (goes on the card)"
    )
    args = parser.parse_args()
    if args.copy:
        ship_copy(args.source, args.target, args.selection, args.why)
    elif args.receiver:
        ship_trained(args.source, args.target, args.receiver)
    else:
        parser.error("give the receiver model's name, or --copy")
    print(
        f"shipped {args.source} as {args.target}: {', '.join(sorted(p.name for p in args.target.iterdir()))}"
    )


if __name__ == "__main__":
    main()
