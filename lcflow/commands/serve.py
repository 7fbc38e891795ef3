"""`lcflow serve sharer|receiver`: run one of the two services until SIGTERM."""

from __future__ import annotations

import argparse

from lcflow.commands.preflight import check_service
from lcflow.serving.config import ROLES, add_service_flags, config_from_args
from lcflow.serving.telemetry import configure_service_logging, make_tracer_provider


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the sharer or the receiver service",
        description="Run a service. Every flag can also be set by an LCFLOW_* environment variable; "
        "tracing is configured by the standard OTEL_* variables (OTEL_TRACES_EXPORTER=otlp|console|none).",
    )
    roles = p.add_subparsers(dest="role", metavar="ROLE", required=True)
    for role in ROLES:
        rp = roles.add_parser(
            role,
            help=f"the {role} service",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_service_flags(rp, role)
        rp.set_defaults(func=run)


def run(args) -> int:
    from lcflow.serving.server import serve_until_signal  # keeps --help fast

    config = config_from_args(args.role, args)
    check_service(config)  # a typo in --model or --adapter: one line now, not a traceback after loading
    configure_service_logging(config.log_level)
    provider = make_tracer_provider(f"lcflow-{config.role}")
    if config.role == "sharer":
        from lcflow.serving.sharer import serve  # keeps --help fast
    else:
        from lcflow.serving.receiver import serve  # keeps --help fast
    running, _ = serve(config, provider)
    serve_until_signal(running, config.shutdown_grace_s)
    provider.shutdown()  # flush spans still in the batch exporter
    return 0
