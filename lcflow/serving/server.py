"""What both services share: errors with gRPC status codes, request checks, the concurrency
bound, model loading behind the health service, and building and stopping a gRPC server.

The services themselves (lcflow.serving.sharer, lcflow.serving.receiver) hold only their RPC logic.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import server_interceptor

from lcflow.adapter import LatentAdapter
from lcflow.adapter.c2c import C2CFuser, C2CSender
from lcflow.adapter.config import AdapterConfig
from lcflow.core.kv import model_identity
from lcflow.handoff.pair import GenerationSettings
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.provision import load_model_and_tokenizer
from lcflow.serving.config import ServiceConfig
from lcflow.serving.security import CertificateFiles
from lcflow.transport import MODE_FROM_PROTO, WireError
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


# --- request checks ---------------------------------------------------------------------------


# The roles every chat template knows (the .proto's ChatMessage.role); a custom role would be
# rendered by no template the same way, so it is refused rather than passed on as plain text.
CHAT_ROLES = ("system", "user", "assistant")


def messages_text(messages: pb.ChatMessages, field: str = "messages") -> str:
    """Chat messages as one text block ("role: content" per message), for a context or a prompt.
    A role outside CHAT_ROLES is INVALID_ARGUMENT naming the allowed ones."""
    for i, message in enumerate(messages.messages):
        if message.role not in CHAT_ROLES:
            raise invalid(
                f"{field}[{i}] has role {message.role!r}; a chat role is one of {', '.join(CHAT_ROLES)}"
            )
    return "\n".join(f"{m.role}: {m.content}" for m in messages.messages)


def mode_of(value: int) -> str:
    """The mode a request names (lcf, lcfx, c2c, text, none), or INVALID_ARGUMENT saying whether it
    was unset or a number this server does not know, and which modes there are."""
    mode = MODE_FROM_PROTO.get(value)
    if mode is not None:
        return mode
    valid = ", ".join(f"{pb.Mode.Name(v)} ({v})" for v in sorted(MODE_FROM_PROTO))
    if value == pb.MODE_UNSPECIFIED:
        raise invalid(f"mode is unset: choose one of {valid}")
    raise invalid(f"mode {value} is not a mode this server knows: choose one of {valid}")


def prompt_of(message) -> str:
    """The prompt of a HandoffRequest or ReceiverRequest (text, or chat messages joined)."""
    which = message.WhichOneof("prompt" if isinstance(message, pb.ReceiverRequest) else "receiver_prompt")
    if which == "prompt_text":
        return message.prompt_text
    if which == "prompt_messages":
        return messages_text(message.prompt_messages, "prompt_messages")
    return ""


def describe_texts(config: ServiceConfig, **texts: str) -> str:
    """Texts for a log line: their sizes only, unless --log-content.

    Prompts, contexts and answers are the users' data: logs are kept longer, read by more people
    and shipped further than the traffic itself, so by default no log line (and no error
    message, no span attribute) carries them; --log-content is for debugging a deployment you own."""
    parts = []
    for name, text in texts.items():
        if config.log_content:
            parts.append(f"{name} {text!r}")
        else:
            parts.append(f"{name} {len(text)} chars")
    return ", ".join(parts)


def check_text(name: str, text: str, config: ServiceConfig, required: bool = True) -> str:
    if required and not text.strip():
        raise invalid(f"{name} is empty: give the text the model should read")
    if len(text) > config.max_prompt_chars:
        raise invalid(
            f"{name} has {len(text)} characters, more than the limit of {config.max_prompt_chars}; "
            "shorten it or raise --max-prompt-chars"
        )
    return text


def check_tokens(name: str, count: int, config: ServiceConfig) -> None:
    if count > config.max_context_tokens:
        raise invalid(
            f"{name} has {count} tokens, more than the limit of {config.max_context_tokens}; "
            "shorten it or raise --max-context-tokens"
        )


def generation_settings(proto: pb.GenerationSettings) -> GenerationSettings:
    if proto.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise invalid(f"max_new_tokens {proto.max_new_tokens} is above the limit of {MAX_NEW_TOKENS_LIMIT}")
    if proto.temperature < 0:
        raise invalid(f"temperature must be >= 0 (0 = greedy), not {proto.temperature}")
    if not 0 <= proto.top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], not {proto.top_p}")
    return GenerationSettings(
        max_new_tokens=proto.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=proto.temperature,
        top_p=proto.top_p or 1.0,
        stop=list(proto.stop),
        seed=proto.seed if proto.HasField("seed") else None,
    )


def adapter_id(config_dict: dict) -> str:
    """Both halves of one adapter share its config, so both services compute the same id."""
    canonical = json.dumps(config_dict, sort_keys=True).encode()
    return f"{config_dict['mode']}:{hashlib.sha256(canonical).hexdigest()[:16]}"


# --- engines -------------------------------------------------------------------------------


def load_model_for(config: ServiceConfig):
    """The service's model and tokenizer, as its flags say (name, device, dtype)."""

    return load_model_and_tokenizer(config.model, device=config.device, dtype=config.dtype)


def load_adapter_half(model, tokenizer, adapter_dir: str, part: str, name: str | None):
    """(model identity, adapter half or None, adapter id) for a service: the encoder half for the
    sharer, the decoder half for the receiver, refused if trained for another model."""

    identity = model_identity(model, tokenizer, name=name)
    if not adapter_dir:
        return identity, None, ""
    role = "sharer" if part == "encoder" else "receiver"
    if AdapterConfig.load(adapter_dir).mode == "c2c":
        adapter = load_c2c_half(adapter_dir, part, model.device, **{role: identity})
        return identity, adapter, adapter_id(adapter.config.to_dict())
    adapter = LatentAdapter.from_pretrained(adapter_dir, part=part, device=model.device, **{role: identity})
    if part == "encoder" and adapter.config.packet == "bridge":
        adapter.encoder.tokenizer()  # the receiver's tokenizer, by name: fail at start, not mid-request
    return identity, adapter, adapter_id(adapter.config.to_dict())


@dataclass
class ServedC2C:
    """A C2C adapter as a service holds it, shaped like a LatentAdapter (config, encoder, decoder):
    the sharer's half is a C2CSender (no weights: it sends the sharer's KV), the receiver's the
    C2CFuser."""

    config: object  # AdapterConfig
    encoder: object | None = None
    decoder: object | None = None

    def state_dict(self) -> dict:
        """The loaded weights (for the registry's memory bound): the fuser's, none on the sharer."""
        return self.decoder.state_dict() if self.decoder is not None else {}


def load_c2c_half(adapter_dir: str, part: str, device, **models) -> ServedC2C:

    if part == "encoder":
        config = AdapterConfig.load(adapter_dir)
        config.check_models(**models)
        return ServedC2C(config, encoder=C2CSender(config))
    fuser = C2CFuser.from_pretrained(adapter_dir, device=device, **models)
    fuser.sharer_rope()  # refuse an adapter without the sharer's RoPE now, not at the first request
    return ServedC2C(fuser.config, decoder=fuser)


def require_adapter(adapter, mode: str, role: str) -> None:
    """FAILED_PRECONDITION unless this engine holds an adapter of the requested latent mode."""
    have = f"a {adapter.config.mode} adapter" if adapter is not None else "no adapter"
    if adapter is None or adapter.config.mode != mode:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"mode {mode} needs a {mode} adapter but this {role} has {have}; "
            "start it with --adapter pointing at one or --adapters DIR holding one, or use TEXT or NONE",
        )


# --- concurrency ------------------------------------------------------------------------------


class ConcurrencyLimit:
    """At most `limit` handoffs at once; up to `max_queue` more wait for a slot, in arrival order,
    each no longer than its own deadline (DEADLINE_EXCEEDED) or its client (CANCELLED); past that,
    RESOURCE_EXHAUSTED at once, with a retry hint (`grpc-retry-pushback-ms`) that gRPC's retry
    policy honours.

    Why a queue: a burst of requests a little larger than the slots should be served a little
    later, not refused; why bounded: beyond a few per slot the wait outlasts any sensible
    deadline, and each waiting call holds a server thread and its request's memory."""

    def __init__(self, limit: int, max_queue: int = 0):
        self.limit, self.max_queue = limit, max_queue
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self.in_flight = 0
        self._hold_s = 1.0  # moving average of how long a slot is held, for the retry hint

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def retry_hint_ms(self) -> int:
        """Roughly when a slot should be free for one more request: the queue ahead of it times
        the average hold, spread over the slots; within 50 ms .. 10 s."""
        estimate = self._hold_s * (len(self._waiting) + 1) / self.limit * 1000
        return int(min(10_000, max(50, estimate)))

    @contextlib.contextmanager
    def slot(self, context: grpc.ServicerContext | None = None) -> Iterator[float]:
        """Hold a slot for the `with` block; yields the milliseconds spent queued for it."""
        queued_at = time.perf_counter()
        with self._cond:
            if self.in_flight >= self.limit or self._waiting:
                self._wait_in_queue(context)  # returns holding a slot handed over by _release
            else:
                self.in_flight += 1
        waited_ms = (time.perf_counter() - queued_at) * 1000
        started = time.perf_counter()
        try:
            yield waited_ms
        finally:
            with self._cond:
                self._hold_s = 0.8 * self._hold_s + 0.2 * (time.perf_counter() - started)
                self._release()

    def _release(self) -> None:
        """With the lock held: give the slot to the first in line, or free it.

        Why hand it over here rather than let the waiter take it when it wakes: the queue must
        shrink at the same instant the slot frees. Otherwise a client that sends its next request
        as soon as its previous one ends finds the queue still full (the woken waiter has not run
        yet) and is refused, though it never had more than max_concurrent + max_queue outstanding."""
        if self._waiting:
            self._waiting.popleft().granted = True  # in_flight unchanged: the slot changes hands
            self._cond.notify_all()
        else:
            self.in_flight -= 1

    def _wait_in_queue(self, context) -> None:
        """With the lock held: queue up, and return once _release has handed this call a slot."""
        if len(self._waiting) >= self.max_queue:
            hint = self.retry_hint_ms()
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limit} handoffs are in flight and {len(self._waiting)} waiting (the limits); "
                f"retry in about {hint} ms, or raise --max-concurrent / --max-queue",
                trailing=(("grpc-retry-pushback-ms", str(hint)),),
            )
        ticket = _Ticket()
        self._waiting.append(ticket)
        try:
            while not ticket.granted:
                remaining = context.time_remaining() if context is not None else None
                if context is not None and not context.is_active():
                    raise ServiceError(grpc.StatusCode.CANCELLED, "the client went away while queued")
                if remaining is not None and remaining <= 0:
                    raise ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the deadline passed while queued for a slot ({self.limit} handoffs in flight); "
                        "retry later, give a longer deadline, or raise --max-concurrent",
                    )
                # woken when a slot is handed over; the timeout only bounds how late a deadline is noticed
                self._cond.wait(timeout=0.1 if remaining is None else min(remaining, 0.1))
        except BaseException:
            if ticket.granted:  # handed a slot just as it gave up: pass it on
                self._release()
            else:
                self._waiting.remove(ticket)
            raise


@dataclass
class _Ticket:
    """A call's place in the queue; `granted` once a freed slot has been handed to it."""

    granted: bool = False


def queue_span(tracer, name: str, queued_at_ns: int, queue_ms: float) -> None:
    """The wait for a slot as its own span (recorded once it is over), so traces show queueing."""
    span = tracer.start_span(name, start_time=queued_at_ns)
    span.set_attribute("lcflow.queue_ms", queue_ms)
    span.end(end_time=queued_at_ns + int(queue_ms * 1e6))


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
