"""Test helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

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


# --- both services on loopback, in this process (tests of the clients and the examples) -------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_adapter_dir(tiny_pair, directory, mode: str = "lcfx") -> str:
    """A tiny adapter (b=16, 4 slots, seeded random weights) for the `tiny_pair` fixture's models,
    saved in `directory`: enough for the services to run LCF / LCF-X handoffs."""
    from lcflow.adapter import LatentAdapter
    from lcflow.core.kv import model_identity

    (ms, ts), (mr, tr) = tiny_pair
    torch.manual_seed(3)
    adapter = LatentAdapter.for_models(
        mode, model_identity(ms, ts), model_identity(mr, tr), bottleneck=16, slots=4
    )
    return str(adapter.save_pretrained(directory))


def tiny_c2c_adapter_dir(tiny_pair, directory, with_rope: bool = True) -> str:
    """A tiny C2C adapter (seeded random fuser, both gates open so that fusing changes the
    answer) for the `tiny_pair` models, saved in `directory`; without the sharer's RoPE
    (`with_rope=False`) as adapters trained before C2C was served."""
    from lcflow.adapter.c2c import C2CFuser, record_sharer_rope
    from lcflow.core.kv import model_identity

    (ms, ts), (mr, tr) = tiny_pair
    torch.manual_seed(5)
    fuser = C2CFuser.for_models(model_identity(ms, ts), model_identity(mr, tr))
    with torch.no_grad():
        for projector in fuser.projectors.values():
            projector.key.gate_logit.fill_(1.0)
            projector.value.gate_logit.fill_(1.0)
    if with_rope:
        record_sharer_rope(fuser.config, ms)
    return str(fuser.save_pretrained(directory))


@dataclass
class Services:
    sharer: str  # the sharer's address, HOST:PORT
    sharer_service: object  # lcflow.serving.sharer.SharerService (its `sessions`, ...)
    receiver_service: object
    receiver: str = ""  # the receiver's address, HOST:PORT


@contextlib.contextmanager
def running_services(
    tiny_pair, adapter_dir: str = "", spans=None, sharer: dict | None = None, receiver: dict | None = None
):
    """A receiver and a sharer on the `tiny_pair` models, on loopback ports, stopped on exit.
    Without `adapter_dir` (the default adapter) only TEXT and NONE handoffs run, unless `sharer`
    and `receiver` give `adapters`. `spans`: an exporter for both services' spans; `sharer`,
    `receiver`: more ServiceConfig fields for each (TLS, a token, adapters, ...)."""
    from lcflow.serving.config import ServiceConfig
    from lcflow.serving.loading import ReceiverEngine, SharerEngine
    from lcflow.serving.receiver import serve as serve_receiver
    from lcflow.serving.sharer import serve as serve_sharer
    from lcflow.serving.telemetry import make_tracer_provider

    (ms, ts), (mr, tr) = tiny_pair
    receiver_port, sharer_port = free_port(), free_port()
    receiver_running, receiver_service = serve_receiver(
        ServiceConfig("receiver", model="tiny", port=receiver_port, **(receiver or {})),
        make_tracer_provider("lcflow-receiver", spans),
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
        try:
            yield Services(
                f"127.0.0.1:{sharer_port}", sharer_service, receiver_service, f"127.0.0.1:{receiver_port}"
            )
        finally:
            sharer_running.stop(1)
    finally:
        receiver_running.stop(1)


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


def same_model_alignment(model_and_tok, bottleneck: int, documents: int = 24):
    """A dense alignment of a tiny model with itself (near exact at full width, ridge 1e-6)."""
    from lcflow.core.layer_map import build_layer_map
    from lcflow.packets.alignment import collect_stats, fit_alignment
    from lcflow.training.corpus import alignment_corpus

    layers = model_and_tok[0].config.num_hidden_layers
    layer_map = build_layer_map(layers, layers)
    stats = collect_stats(model_and_tok, model_and_tok, alignment_corpus(documents), layer_map, 0, False)
    return fit_alignment(stats, 0, bottleneck, ridge=1e-6)


def span_adapter(sharer, receiver, alignment, slots: int, selection: str = "sentences"):
    """An LCF-X span adapter whose halves are `alignment` (no task training)."""
    from lcflow.adapter import LatentAdapter
    from lcflow.adapter.spans import load_alignment
    from lcflow.core.kv import model_identity

    adapter = LatentAdapter.for_models(
        "lcfx",
        model_identity(*sharer),
        model_identity(*receiver),
        packet="spans",
        slots=slots,
        selection=selection,
        bottleneck=alignment.config.bottleneck,
        sharer_window=alignment.config.window,
    )
    load_alignment(adapter, alignment)
    return adapter.eval()


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
    """The spans the OpenTelemetry console exporter printed into a log (each a JSON object from a
    line "{" to a line "}"), other lines skipped."""
    import json

    spans, lines = [], None
    for line in text.splitlines():
        if line == "{":
            lines = []
        if lines is not None:
            lines.append(line)
        if line == "}" and lines is not None:
            spans.append(json.loads("\n".join(lines)))
            lines = None
    return spans


def set_shape(header: pb.LatentHeader, segment: int, shape) -> None:
    """Change one tensor's declared shape and keep total_raw_bytes consistent with it, so that
    only the shape itself is wrong."""
    import math

    from lcflow.transport.segments import ITEMSIZE

    tensor = header.segments[segment].tensors[0]
    tensor.shape[:] = list(shape)
    header.total_raw_bytes = sum(
        ITEMSIZE[t.dtype] * math.prod(t.shape) for s in header.segments for t in s.tensors
    )
