"""Test helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import zlib
from pathlib import Path

import grpc
import pytest
import torch

from lcflow.adapter import LatentAdapter
from lcflow.cli import main
from lcflow.core.kv import model_identity
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver, Sharer, receiver_view
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.tasks import get_task
from lcflow.transport import LatentPacket, WireError, WireLimits, assemble

# --- both services on loopback, in this process (tests of the clients and the examples) -------------


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free now, and never one this process was given before.

    grpcio shares subchannels between channels to one address, process-wide: a port reused after
    an earlier test stopped its server there can find that subchannel in connect backoff, and a
    new channel to the new server fails at once with the old "Connection refused"."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


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


# --- moved from the test modules that other test modules borrowed them from ---


CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."


PROMPT = "Where does Mira Volkov live?"


RECEIVER_CONTEXT = "Ada Brook owns a turtle."


def make_adapter_dir(tiny_pair, tmp_path_factory, mode, **options):
    (ms, ts), (mr, tr) = tiny_pair
    adapter = LatentAdapter.for_models(
        mode, model_identity(ms, ts), model_identity(mr, tr), **{"bottleneck": 16, "slots": 4, **options}
    )
    torch.manual_seed(3)
    for name, p in adapter.named_parameters():  # make the latents matter to the answer
        if name.endswith("up.weight") or name.startswith(("encoder.proj", "decoder.proj")):
            torch.nn.init.normal_(p, std=0.3)
    return adapter.save_pretrained(tmp_path_factory.mktemp(f"adapter-{mode}"))


def bf16(latent: torch.Tensor) -> torch.Tensor:
    """What the wire does to a latent without quantization."""
    return latent.to(torch.bfloat16).float()


def in_process_prepared(tiny_pair, adapter_dir, mode, on_the_wire=bf16):
    """(receiver, its prepared input) for the handoff without the services, each latent passed
    through `on_the_wire` (rounded to bf16 as on the wire, by default)."""
    (ms, ts), (mr, tr) = tiny_pair
    adapter = LatentAdapter.from_pretrained(adapter_dir)
    sharer, receiver = (
        Sharer(ms, ts, adapter.encoder, adapter.config),
        Receiver(mr, tr, adapter.decoder, adapter.config),
    )
    with torch.inference_mode():
        latents = sharer.encode(
            sharer.prefill(CONTEXT), receiver_view(RECEIVER_CONTEXT, PROMPT), question=PROMPT
        )
        latents.layers = {t: on_the_wire(z) for t, z in latents.layers.items()}
        prepared = receiver.prepare(mode, PROMPT, latents, context=CONTEXT, receiver_context=RECEIVER_CONTEXT)
    return receiver, prepared


def in_process_answer(tiny_pair, adapter_dir, mode, max_new_tokens, on_the_wire=bf16):
    """The same handoff's answer without the services."""
    receiver, prepared = in_process_prepared(tiny_pair, adapter_dir, mode, on_the_wire)
    with torch.inference_mode():
        return receiver.generate(prepared, GenerationSettings(max_new_tokens=max_new_tokens))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run `lcflow ARGV` as the shell would (sys.argv set); returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["lcflow", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def write_task_file(path: Path, count: int) -> Path:
    samples = get_task("facts-cross").samples("train", count, seed=3)
    path.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples))
    return path


def make_packet(dtype=torch.bfloat16, tokens: int = 64, width: int = 16, layers=(0, 3, 5)) -> LatentPacket:
    generator = torch.Generator().manual_seed(0)

    def latent() -> torch.Tensor:
        if dtype == torch.int32:
            return torch.randint(-1000, 1000, (1, tokens, width), generator=generator, dtype=torch.int32)
        return torch.randn(1, tokens, width, generator=generator).to(dtype)

    return LatentPacket(
        mode="lcf",
        adapter_id="adapter-test",
        sharer_id="sharer-test",
        receiver_id="receiver-test",
        layers=list(layers),
        tensors_per_layer={layer: {"latent": latent()} for layer in layers},
        shared_tensors={"token_spans": torch.arange(tokens * 2, dtype=torch.int32).view(tokens, 2)},
        meta={"tokens": str(tokens)},
    )


def expect_error(messages, code: grpc.StatusCode, limits: WireLimits | None = None) -> WireError:
    with pytest.raises(WireError) as caught:
        assemble(messages, limits)
    assert caught.value.code == code, caught.value.details
    return caught.value


def with_segment_payload(messages, payload: bytes) -> list[pb.LatentMessage]:
    """The stream with the first chunk's payload replaced, every CRC recomputed (a lying sender)."""
    first = chunk_indices(messages)[0]
    assert messages[first].chunk.last_in_segment, "the test needs a segment sent as one chunk"
    messages[first].chunk.payload = payload
    messages[first].chunk.crc32 = zlib.crc32(payload)
    payloads = [messages[i].chunk.payload for i in chunk_indices(messages)]
    messages[-1].trailer.crc32 = zlib.crc32(b"".join(payloads))
    messages[-1].trailer.total_wire_bytes = sum(len(p) for p in payloads)
    return messages


def chunk_indices(messages) -> list[int]:
    return [i for i, m in enumerate(messages) if m.WhichOneof("message") == "chunk"]


# --- a latent stream sent by hand to a running receiver (the service tests) ---
