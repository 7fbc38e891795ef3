"""Copy an adapter directory with some of its config fields changed, weights untouched.

    python scripts/adapter_copy.py adapters/gemma3-to-gemma3-lcfx runs/long-init \
        --set slots=128 --set selection_chunk=128

Used where a run needs the shipped adapter read differently (more positions, a chunked
selection; scripts/long_documents.sh, build_long in scripts/build_adapters.sh). Each value is
parsed as JSON (a bare word is taken as a string), and the changed config is validated by
`AdapterConfig` before anything is written. The copy records where it came from and what changed
in `training.copied_from`. The model card (README.md, model_card.json) is not copied: its
numbers describe the source, not the copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from lcflow.adapter.card import CARD_FILES
from lcflow.adapter.config import AdapterConfig


def parse_setting(text: str) -> tuple[str, object]:
    """'slots=128' -> ('slots', 128); a value that is not JSON is kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes FIELD=VALUE, not {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def copy_adapter(source: Path, destination: Path, settings: dict[str, object]) -> AdapterConfig:
    """Validate the changed config, then copy `source` to `destination` (replaced) with it."""
    if destination.resolve() == source.resolve() or source.resolve().is_relative_to(destination.resolve()):
        raise ValueError(f"{destination} would replace {source} itself: copy to another directory")
    data = AdapterConfig.load(source).to_dict()
    unknown = sorted(set(settings) - set(data))
    if unknown:
        raise ValueError(f"unknown adapter config field(s) {unknown}; see {source}/adapter_config.json")
    for key, value in settings.items():
        # exact types: JSON's true is not a count of slots (bool is an int to isinstance)
        if type(value) is not type(data[key]) and not (isinstance(data[key], float) and type(value) is int):
            expected, example = type(data[key]).__name__, json.dumps(data[key])
            raise ValueError(f"{key}={json.dumps(value)}: {key} expects {expected} (like {example})")
    data.update(settings)
    data["training"] = dict(data["training"], copied_from={"adapter": str(source), "changed": settings})
    config = AdapterConfig.from_dict(data)
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*CARD_FILES))
    config.save(destination)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="the adapter directory to copy")
    parser.add_argument("destination", type=Path, help="where the copy goes (replaced if it exists)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a config field to change (repeat)"
    )
    args = parser.parse_args()
    try:
        settings = dict(parse_setting(text) for text in args.set)
        copy_adapter(args.source, args.destination, settings)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"adapter_copy: {err}", file=sys.stderr)
        return 2
    print(f"{args.destination}: {args.source} with {settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
