"""Container health check: ask a local lcflow service's grpc.health.v1 Health service.

Exit 0 when the service answers SERVING, 1 otherwise (NOT_SERVING while the model loads,
connection refused, timeout, unknown service). Docker's HEALTHCHECK and compose run it as
`python /opt/lcflow/healthcheck.py [--port P]`; Kubernetes uses its native `grpc:` probes instead.

Which port: --port, else LCFLOW_HEALTH_PORT (the plaintext health-only port a service with TLS
opens), else LCFLOW_PORT, else the two default ports (50051 sharer, 50052 receiver) in turn, the
first one that accepts a connection deciding: one container runs one service, so whichever
default port answers is that service's. The check itself is always plaintext.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORTS = (50051, 50052)


def check(host: str, port: int, service: str, timeout: float) -> tuple[bool | None, str]:
    """(True, status) when SERVING, (False, status) when it answered otherwise, (None, why) when unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # No wait_for_ready: a refused connection fails at once with UNAVAILABLE.
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            why = f"{target}: {err.code().name} {err.details() or ''}".rstrip()
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None, why
            return False, why
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to ask (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: LCFLOW_HEALTH_PORT, else LCFLOW_PORT, else 50051 then 50052)",
    )
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for connecting and for the call")
    args = parser.parse_args(argv)

    if args.port is not None:
        ports = (args.port,)
    elif os.environ.get("LCFLOW_HEALTH_PORT", "0") not in ("", "0"):
        ports = (int(os.environ["LCFLOW_HEALTH_PORT"]),)
    elif os.environ.get("LCFLOW_PORT"):
        ports = (int(os.environ["LCFLOW_PORT"]),)
    else:
        ports = DEFAULT_PORTS
    reasons = []
    for port in ports:
        serving, why = check(args.host, port, args.service, args.timeout)
        if serving is None:  # nothing listening there: try the next default port
            reasons.append(why)
            continue
        print(why)
        return 0 if serving else 1
    print("; ".join(reasons), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
