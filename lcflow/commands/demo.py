"""`lcflow demo`: the README's main command (no flags needed)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from lcflow.core.errors import UsageError
from lcflow.demo import DemoOptions, run_demo
from lcflow.serving.security import add_client_security_flags, client_security_from_args


def register(subparsers) -> None:
    d = DemoOptions()
    p = subparsers.add_parser(
        "demo",
        help="run the sharer and receiver on loopback and compare every text channel with latent handoff",
        description="Provision the demo models if needed, start the sharer and the receiver as two processes "
        "(serving the repository's adapters), ask cross-context questions through the note, the document "
        "forwarded, the sentences LCF-X selects forwarded, and LCF_X and, where an LCF adapter fits the "
        "pair, same-context ones through the note and LCF; print answers, scores, bytes and timings, stop both.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sharer-model", default=d.sharer_model, help="sharer model (name, directory or hub id)")
    p.add_argument(
        "--receiver-model", default=d.receiver_model, help="receiver model (name, directory or hub id)"
    )
    p.add_argument(
        "--adapter", default=d.adapter, help="LCF-X adapter directory (default: the shipped demo adapter)"
    )
    p.add_argument(
        "--adapters",
        default=d.adapters,
        help="directory of adapters both services also serve, one per subdirectory (default: the "
        "repository's adapters/); the same-context part uses an LCF adapter from it",
    )
    p.add_argument("--sharer", default=d.sharer, help="HOST:PORT of running services: only ask the questions")
    p.add_argument(
        "--n", type=int, default=d.n, help="how many cross-context questions (each through every channel)"
    )
    p.add_argument(
        "--same-n",
        type=int,
        default=d.same_n,
        help="how many same-context questions (the note and LCF), where the services hold an LCF adapter for "
        "the pair; 0 skips them",
    )
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest answer, in tokens")
    p.add_argument("--seed", type=int, default=d.seed, help="which held-out questions")
    p.add_argument("--run-dir", default=d.run_dir, help="where the service logs and trace spans go")
    p.add_argument(
        "--startup-timeout-s", type=float, default=d.startup_timeout_s, help="wait this long for health"
    )
    add_client_security_flags(p)  # with --sharer: running services behind TLS or a token
    p.set_defaults(func=run)


def run(args) -> int:

    names = {f.name for f in fields(DemoOptions)} - {"security"}
    security = client_security_from_args(args)
    if not args.sharer and (security.tls or security.auth_token_file):
        raise UsageError(
            "--tls-* and --auth-token-file (or their LCFLOW_* variables) are for --sharer HOST:PORT, "
            "running services; the demo's own services run plaintext on loopback"
        )
    options = DemoOptions(**{k: v for k, v in vars(args).items() if k in names}, security=security)
    try:
        run_demo(options)
    except KeyboardInterrupt:
        print("\ninterrupted; both services were stopped")
        return 130
    return 0
