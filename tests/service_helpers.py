"""Starting and driving the services in tests: the one service starter (start_services, and
running_services and Pair around it), latent streams sent by hand, spans and logs read back."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field

import grpc
import torch
from helpers import CONTEXT, PROMPT, free_port

from lcflow.core.kv import identity_id
from lcflow.handoff.pair import receiver_view
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.transport import CodecConfig, LatentPacket, packet_messages


def latent_stream(engine, context: str, prompt: str, meta: dict | None = None) -> list[pb.LatentMessage]:
    """A valid Receive stream made by a sharer engine, in its adapter's mode (LCF-X, LCF or C2C):
    the request, then the packet in 64-byte chunks (many chunks, so tests can damage one); the
    same-context modes send the context and the token spans too. `meta` goes into the header."""
    from lcflow.core.kv import identity_id
    from lcflow.core.names import SAME_CONTEXT_MODES
    from lcflow.transport import MODE_TO_PROTO

    mode = engine.adapter.config.mode
    same_context = mode in SAME_CONTEXT_MODES
    with torch.inference_mode():
        shared = engine.sharer.prefill(context)
        layers = dict(engine.sharer.encode_layers(shared, receiver_view("", prompt)))
    packet = LatentPacket(
        mode=mode,
        adapter_id=engine.adapter_id,
        sharer_id=identity_id(engine.identity),
        receiver_id=identity_id(engine.adapter.config.receiver),
        layers=list(layers),
        tensors_per_layer={t: {"latent": z.to(torch.bfloat16).contiguous()} for t, z in layers.items()},
        shared_tensors={"token_spans": shared.spans} if same_context else {},
        meta=meta or {},
    )
    request = pb.ReceiverRequest(
        prompt_text=prompt,
        context_text=context if same_context else "",
        mode=MODE_TO_PROTO[mode],
        generation=pb.GenerationSettings(max_new_tokens=2),
    )
    return [pb.LatentMessage(request=request), *packet_messages(packet, CodecConfig(chunk_size=64))]


@dataclass
class Services:
    """A receiver and a sharer on the tiny models, in this process, on loopback ports."""

    sharer: str  # the sharer's address, HOST:PORT
    sharer_service: object  # lcflow.serving.sharer.SharerService (its `sessions`, ...)
    receiver_service: object
    receiver: str = ""  # the receiver's address, HOST:PORT
    servers: list = field(default_factory=list)  # the running servers: sharer, receiver
    receiver_tracer: object = None

    @property
    def sharer_running(self):
        return self.servers[0]

    @property
    def receiver_running(self):
        return self.servers[1]

    def stop(self, grace_s: float = 1) -> None:
        for server in self.servers:
            server.stop(grace_s)

    def restart_receiver(self) -> None:
        """Stop the receiver and start it again on the same port, with the same settings and model."""
        from lcflow.serving.receiver import serve as serve_receiver

        self.servers[1].stop(1)
        self.servers[1], self.receiver_service = serve_receiver(
            self.receiver_service.config, self.receiver_tracer, self.receiver_service.engine
        )


def start_services(
    tiny_pair, adapter_dir: str = "", spans=None, sharer: dict | None = None, receiver: dict | None = None
) -> Services:
    """The one way the tests start both services: a receiver and a sharer on the `tiny_pair`
    models. Without `adapter_dir` (the default adapter) only TEXT and NONE handoffs run, unless
    `sharer` and `receiver` give `adapters`. `spans`: an exporter for both services' spans;
    `sharer`, `receiver`: more ServiceConfig fields for each (TLS, a token, adapters, limits)."""
    from lcflow.serving.config import ServiceConfig
    from lcflow.serving.loading import ReceiverEngine, SharerEngine
    from lcflow.serving.receiver import serve as serve_receiver
    from lcflow.serving.sharer import serve as serve_sharer
    from lcflow.serving.telemetry import make_tracer_provider

    (ms, ts), (mr, tr) = tiny_pair
    receiver_port, sharer_port = free_port(), free_port()
    receiver_tracer = make_tracer_provider("lcflow-receiver", spans)
    receiver_running, receiver_service = serve_receiver(
        ServiceConfig("receiver", model="tiny", port=receiver_port, **(receiver or {})),
        receiver_tracer,
        ReceiverEngine.from_loaded(mr, tr, str(adapter_dir)),
    )
    try:
        sharer_running, sharer_service = serve_sharer(
            ServiceConfig(
                "sharer",
                model="tiny",
                port=sharer_port,
                receiver=f"127.0.0.1:{receiver_port}",
                **(sharer or {}),
            ),
            make_tracer_provider("lcflow-sharer", spans),
            SharerEngine.from_loaded(ms, ts, str(adapter_dir)),
        )
    except BaseException:
        receiver_running.stop(1)
        raise
    return Services(
        f"127.0.0.1:{sharer_port}",
        sharer_service,
        receiver_service,
        f"127.0.0.1:{receiver_port}",
        [sharer_running, receiver_running],
        receiver_tracer,
    )


@contextlib.contextmanager
def running_services(
    tiny_pair, adapter_dir: str = "", spans=None, sharer: dict | None = None, receiver: dict | None = None
):
    """start_services, stopped on exit."""
    services = start_services(tiny_pair, adapter_dir, spans, sharer, receiver)
    try:
        yield services
    finally:
        services.stop()


class Pair:
    """Both services for one adapter mode (start_services, the same ServiceConfig fields on each),
    with a traced client and raw stubs of both (untraced, so that calls keep their cancel())."""

    def __init__(self, tiny_pair, adapter_dir, mode, spans, **config):
        import grpc

        from lcflow.client import HandoffClient
        from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
        from lcflow.serving.telemetry import make_tracer_provider

        self.mode, self.spans, self.adapter_dir = mode, spans, adapter_dir
        self.running = start_services(tiny_pair, str(adapter_dir), spans, sharer=config, receiver=config)
        self.sharer_service, self.receiver_service = (
            self.running.sharer_service,
            self.running.receiver_service,
        )
        self.sharer_port = int(self.running.sharer.rpartition(":")[2])
        self.receiver_port = int(self.running.receiver.rpartition(":")[2])
        self.client = HandoffClient(self.running.sharer, make_tracer_provider("client", spans), timeout_s=60)
        self.receiver_stub = pb_grpc.ReceiverStub(grpc.insecure_channel(self.running.receiver))
        self.sharer_stub = pb_grpc.SharerStub(grpc.insecure_channel(self.running.sharer))

    @property
    def sharer_running(self):
        return self.running.sharer_running

    @property
    def receiver_running(self):
        return self.running.receiver_running

    def stop(self):
        self.running.stop()


def stop_processes(processes) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL after 15 s)."""
    import signal
    import subprocess

    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def mutual_tls_server_settings(directory, token: str) -> dict:
    """A private CA, server and client certificates and a token file written to `directory`, and
    the server settings (ServiceConfig fields) that require them."""
    from lcflow.commands.certs import make_certs

    make_certs(directory, ["localhost", "127.0.0.1"])
    (directory / "token").write_text(token + "\n")
    return {
        "tls_cert": str(directory / "server.pem"),
        "tls_key": str(directory / "server-key.pem"),
        "tls_client_ca": str(directory / "ca.pem"),
        "auth_token_file": str(directory / "token"),
    }


def trace_spans(exporter, trace_id: str) -> dict:
    """The finished spans of one trace (hex id, as a summary gives it), by (service, span name)."""
    finished = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    return {(s.resource.attributes["service.name"], s.name): s for s in finished}


def check_demo_output(out: str, questions: int, same: int = 0) -> None:
    """What `lcflow demo` prints for its questions, wherever it runs (two local processes, or
    `--sharer` against the compose services): each question with its expected answer; for each
    cross-context one a NOTE, FORWARD, SELECTED and LCFX answer line, for each of `same`
    same-context ones a NOTE and an LCF line, each with its trace id; and one summary line per
    part and channel."""
    parts = 1 + (same > 0)
    assert out.count("question:") == questions + same and out.count("expected:") == questions + same, out
    assert out.count("     NOTE: ") == questions + same + parts, out
    for label in ("FORWARD", "SELECTED", "LCFX"):
        assert out.count(f" {label}: ") == questions + 1, (label, out)
    assert out.count("      LCF: ") == (same + 1 if same else 0), out
    readers = out.count("   READER: ")  # the pair's text reader, where the services hold one
    assert readers in (0, questions + 1), out
    per_question = 4 + (readers > 0)
    assert len(re.findall(r" trace [0-9a-f]{32}$", out, re.M)) == per_question * questions + 2 * same, out
    assert "median time to first token" in out and "docs/results.md" in out, out
    if not same:
        assert "the same-context part is skipped" in out, out


def console_spans(text: str) -> list[dict]:
    """The spans the OpenTelemetry console exporter printed into a log (each a JSON object on
    one line, `telemetry.span_as_one_line`), other lines skipped."""

    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and line.endswith("}")]


def latent_messages(pair, codec: CodecConfig | None = None) -> list[pb.LatentMessage]:
    """A valid Receive stream for this pair, made in-process, for tests to damage."""
    engine = pair.sharer_service.engine
    config = engine.adapter.config
    with torch.inference_mode():
        shared = engine.sharer.prefill(CONTEXT)
        layers = dict(engine.sharer.encode_layers(shared, receiver_view("", PROMPT)))
    packet = LatentPacket(
        mode=pair.mode,
        adapter_id=engine.adapter_id,
        sharer_id=identity_id(engine.identity),
        receiver_id=identity_id(config.receiver),
        layers=list(layers),
        tensors_per_layer={t: {"latent": z.to(torch.bfloat16).contiguous()} for t, z in layers.items()},
        shared_tensors={"token_spans": shared.spans} if pair.mode == "lcf" else {},
    )
    request = pb.ReceiverRequest(
        prompt_text=PROMPT,
        context_text=CONTEXT if pair.mode == "lcf" else "",
        mode=pb.LCF if pair.mode == "lcf" else pb.LCF_X,
        generation=pb.GenerationSettings(max_new_tokens=3),
    )
    return [pb.LatentMessage(request=request), *packet_messages(packet, codec or CodecConfig(chunk_size=64))]


def receive_status(pair, messages) -> grpc.StatusCode:
    try:
        for _ in pair.receiver_stub.Receive(iter(messages), timeout=30):
            pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def still_serves(pair) -> None:
    assert receive_status(pair, latent_messages(pair)) == grpc.StatusCode.OK
    assert pair.client.handoff(PROMPT, mode=pair.mode, context=CONTEXT, max_new_tokens=2).answer is not None


def header_of(messages) -> pb.LatentHeader:
    return messages[1].header


def receive_events(pair, messages) -> tuple[list[pb.HandoffEvent], grpc.StatusCode, str]:
    """Every event the receiver sent before the call ended, its status and details."""
    events = []
    try:
        for event in pair.receiver_stub.Receive(iter(messages), timeout=30):
            events.append(event)
    except grpc.RpcError as err:
        return events, err.code(), err.details()
    return events, grpc.StatusCode.OK, ""


def plain_request(mode) -> pb.LatentMessage:
    return pb.LatentMessage(
        request=pb.ReceiverRequest(
            prompt_text=PROMPT,
            mode=mode,
            text_message="Mira lives in Oslo.",
            generation={"max_new_tokens": 2},
        )
    )


def handoff_outcome(client, mode: str, adapter: str = ""):
    """(status, summary) of one short handoff of the shared prompt, or (status, details) if refused."""
    try:
        result = client.handoff(PROMPT, mode=mode, context=CONTEXT, max_new_tokens=2, adapter=adapter)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, result.summary


def service_process_env(keepalive_s: str, grace_s: str, **settings: str) -> dict[str, str]:
    """The environment of an `lcflow serve` process a test starts: the test's own without LCFLOW_*,
    OTEL_* or proxy settings, one thread, offline, the given keepalive and shutdown grace, plus
    `settings`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LCFLOW_", "OTEL_")) and "proxy" not in k.lower()
    }
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(OTEL_TRACES_EXPORTER="none", LCFLOW_KEEPALIVE_S=keepalive_s, LCFLOW_SHUTDOWN_GRACE_S=grace_s)
    env.update(settings)
    return env
