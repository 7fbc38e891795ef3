"""Wait until every given local port answers grpc.health.v1 SERVING (the services' scripts call it
before their first handoff, so start-up is not measured); exit 1 naming a port that never did.

    python scripts/wait_serving.py 50190 50191 [--timeout 300]
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(port: int, timeout_s: float) -> bool:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return True
        except grpc.RpcError:
            pass  # not listening yet, or still loading
        time.sleep(1)
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ports", type=int, nargs="+", help="local ports of the services")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each")
    args = p.parse_args()
    for port in args.ports:
        if not wait_serving(port, args.timeout):
            sys.exit(f"the service on port {port} never became SERVING")


if __name__ == "__main__":
    main()
