"""What both services share: errors with gRPC status codes, model loading behind the health
service, and building and stopping a gRPC server (request checks: requests.py; the concurrency
bound: concurrency.py; the model and adapter halves: loading.py).

The services themselves (lcflow.serving.sharer, lcflow.serving.receiver) hold only their RPC logic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import server_interceptor

from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.config import ServiceConfig
from lcflow.serving.security import CertificateFiles
from lcflow.transport import WireError
from lcflow.transport.memory import keep_freed_memory

log = logging.getLogger(__name__)

# The two services' full names, as the .proto declares them (health checks and reflection use them).
SHARER_SERVICE = pb.DESCRIPTOR.services_by_name["Sharer"].full_name
RECEIVER_SERVICE = pb.DESCRIPTOR.services_by_name["Receiver"].full_name
MAX_NEW_TOKENS_LIMIT = 2048
DEFAULT_MAX_NEW_TOKENS = 64


class ServiceError(Exception):
    """A request that cannot be served, with the gRPC status to answer and a message saying what to do
    (and trailing metadata to send with it, e.g. a retry hint)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, tuple(trailing)


def invalid(details: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, details)


@contextlib.contextmanager
def status_on_error(context: grpc.ServicerContext, what: str) -> Iterator[None]:
    """Turn our exceptions into the gRPC status they stand for; anything else is INTERNAL."""
    try:
        yield
    except (ServiceError, WireError) as err:
        log.warning("%s refused: %s %s", what, err.code.name, err.details)
        if getattr(err, "trailing", ()):
            context.set_trailing_metadata(err.trailing)
        context.abort(err.code, err.details)
    except grpc.RpcError as err:  # a downstream call failed: pass its status on, saying where
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        log.warning("%s: downstream failed: %s %s", what, code, details)
        # the receiver's retry hint holds for the whole handoff: pass it on to our caller
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        hint = [(k, v) for k, v in trailing or () if k == "grpc-retry-pushback-ms"]
        if hint:
            context.set_trailing_metadata(hint)
        context.abort(code, f"receiver: {details}")


def keepalive_options(config: ServiceConfig, server: bool) -> list[tuple[str, int]]:
    """HTTP/2 keepalive for both ends of a hop. Without it a peer that died without closing its
    socket (killed host, cut link) looks exactly like a slow one, and every call to it waits for
    its deadline; with it the transport fails within ~1.5x the interval and calls end UNAVAILABLE.

    Servers ping their clients half as often (a dead sharer stops the receiver's generation) and
    accept any client's ping rate (max_ping_strikes 0): the two services may be configured with
    different intervals, and a GOAWAY for pinging "too often" would itself be an outage."""
    interval_ms = max(1000, int(config.keepalive_s * 1000))
    if server:
        return [
            ("grpc.keepalive_time_ms", 2 * interval_ms),
            ("grpc.keepalive_timeout_ms", interval_ms),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", interval_ms // 2),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", interval_ms // 2),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging while a stream waits for data
        ("grpc.keepalive_permit_without_calls", 0),
    ]


# --- server -----------------------------------------------------------------------------------


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_name: str
    certificates: CertificateFiles | None = None  # TLS: the watched certificate files
    health_server: grpc.Server | None = None  # --health-port: health alone, in plaintext
    # More to re-read on SIGHUP: the sharer's client certificate towards the receiver.
    reload_hooks: list[Callable[[], None]] = field(default_factory=list)

    def reload_certificates(self) -> None:
        """SIGHUP: re-read the TLS files at the next handshake (changed files are picked up anyway)."""
        if self.certificates is not None:
            self.certificates.reload()
            log.info("SIGHUP: TLS certificate files will be re-read at the next handshake")
        for hook in self.reload_hooks:
            hook()

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", self.service_name):
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        """Refuse new work (health NOT_SERVING, new RPCs rejected) and let in-flight handoffs finish."""
        self.set_serving(False)
        self.server.stop(grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()


def start_server(
    config: ServiceConfig,
    service_name: str,
    add_servicer: Callable[[grpc.Server], None],
    tracer_provider,
) -> RunningServer:
    """A gRPC server with tracing, the health service (NOT_SERVING until told) and optional reflection,
    listening in plaintext or TLS and checking a bearer token as the config says (lcflow.serving.security)."""
    security = config.server_security()
    server = grpc.server(
        # One thread per admitted or queued call (each waits in its own handler), plus spares for
        # sessions, health and refusals.
        futures.ThreadPoolExecutor(
            max_workers=config.max_concurrent + config.max_queue + 4, thread_name_prefix=config.role
        ),
        # The token check is outermost: a call without it is refused before tracing or the handler.
        interceptors=[*security.interceptors(), server_interceptor(tracer_provider=tracer_provider)],
        options=[("grpc.so_reuseport", 0), *keepalive_options(config, server=True)],
    )
    add_servicer(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    port, certificates = security.add_port(server, config.address)
    if port == 0:
        raise RuntimeError(f"could not listen on {config.address}: is the port already in use?")
    server.start()
    running = RunningServer(
        server, health_servicer, port, service_name, certificates, health_only_server(config, health_servicer)
    )
    running.set_serving(False)
    log.info(
        "%s listening on %s:%d, %s (NOT_SERVING until the model is loaded)",
        config.role,
        config.host,
        port,
        security.describe(),
    )
    return running


def health_only_server(config: ServiceConfig, health_servicer) -> grpc.Server | None:
    """--health-port: the same health status, alone and in plaintext on its own port.

    With TLS on, a probe must speak TLS too, and Kubernetes' native grpc probes cannot; this port
    answers grpc.health.v1 only (every other method is UNIMPLEMENTED there), so opening it in
    plaintext reveals no more than whether the service is up."""
    if not config.health_port:
        return None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{config.role}-health")
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{config.host}:{config.health_port}") == 0:
        raise RuntimeError(f"could not listen on {config.host}:{config.health_port} (--health-port): in use?")
    server.start()
    log.info("health alone, in plaintext, on %s:%d", config.host, config.health_port)
    return server


def load_in_background(
    running: RunningServer, load: Callable[[], None], on_error: Callable[[BaseException], None]
):
    """Load the model while the server already answers health checks; SERVING once done."""

    def target():
        try:
            load()
        except BaseException as err:
            log.exception("loading failed")
            on_error(err)
            return
        running.set_serving(True)
        log.info("model loaded; SERVING")

    thread = threading.Thread(target=target, name="lcflow-load", daemon=True)
    thread.start()
    return thread


def serve_service(
    config: ServiceConfig,
    service_name: str,
    service,
    add_servicer,
    load_engine,
    tracer_provider,
    on_load_error=None,
):
    """Start a service's server (health NOT_SERVING), then make it SERVING: at once if
    `service.engine` is already set (tests pass tiny models), else once `load_engine(config)`
    has loaded the model in the background. Either way `service.engine_ready()` runs first (its
    adapters are read, and loaded with --preload). Returns the running server."""
    keep_freed_memory()  # segment-sized buffers reuse freed memory instead of faulting in fresh pages
    running = start_server(
        config, service_name, lambda server: add_servicer(service, server), tracer_provider
    )
    if service.engine is not None:
        service.engine_ready()
        running.set_serving(True)
        return running

    def load() -> None:
        service.engine = load_engine(config)
        service.engine_ready()

    load_in_background(running, load, on_error=on_load_error or exit_on_load_error)
    return running


def exit_on_load_error(err: BaseException) -> None:
    """A service that cannot load its model can serve nothing: say why and exit non-zero."""
    log.critical("cannot load the model: %s", err)
    os._exit(3)


def serve_until_signal(running: RunningServer, grace_s: float) -> None:
    """Block until SIGTERM/SIGINT, then stop gracefully; SIGHUP re-reads the TLS files."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: running.reload_certificates())
    stop.wait()
    log.info("stopping: finishing in-flight handoffs (up to %.0f s)", grace_s)
    running.stop(grace_s)
