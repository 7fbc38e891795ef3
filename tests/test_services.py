"""End to end: both services on loopback with tiny models and tiny adapters, every mode,
one trace across both, and every kind of bad input answered with its exact gRPC status."""

from __future__ import annotations

import contextlib
import socket
import time
import zlib

import grpc
import pytest
import torch
import zstandard
from helpers import set_shape, trace_spans
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lcflow.adapter import LatentAdapter
from lcflow.client import HandoffClient
from lcflow.core.kv import identity_id, model_identity
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver, Sharer, receiver_view
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.concurrency import ConcurrencyLimit
from lcflow.serving.config import ServiceConfig
from lcflow.serving.loading import ReceiverEngine, SharerEngine
from lcflow.serving.receiver import serve as serve_receiver
from lcflow.serving.sharer import serve as serve_sharer
from lcflow.serving.telemetry import make_tracer_provider
from lcflow.transport import CodecConfig, LatentPacket, PacketWriter, TensorSpec, packet_messages

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."
PROMPT = "Where does Mira Volkov live?"
RECEIVER_CONTEXT = "Ada Brook owns a turtle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pair:
    """A running receiver + sharer for one adapter mode, in this process, with an in-memory exporter."""

    def __init__(self, tiny_pair, adapter_dir, mode, spans: InMemorySpanExporter, **config):
        (ms, ts), (mr, tr) = tiny_pair
        self.mode, self.spans, self.adapter_dir = mode, spans, adapter_dir
        self.receiver_port, self.sharer_port = free_port(), free_port()
        self.receiver_running, self.receiver_service = serve_receiver(
            ServiceConfig("receiver", model="tiny", port=self.receiver_port, **config),
            make_tracer_provider("lcflow-receiver", spans),
            ReceiverEngine.from_loaded(mr, tr, str(adapter_dir)),
        )
        self.sharer_running, self.sharer_service = serve_sharer(
            ServiceConfig(
                "sharer",
                model="tiny",
                port=self.sharer_port,
                receiver=f"127.0.0.1:{self.receiver_port}",
                **config,
            ),
            make_tracer_provider("lcflow-sharer", spans),
            SharerEngine.from_loaded(ms, ts, str(adapter_dir)),
        )
        self.client = HandoffClient(
            f"127.0.0.1:{self.sharer_port}", make_tracer_provider("client", spans), timeout_s=60
        )
        self.receiver_stub = pb_grpc.ReceiverStub(grpc.insecure_channel(f"127.0.0.1:{self.receiver_port}"))
        # Untraced, so that calls keep their cancel() (the tracing interceptor wraps streams in generators).
        self.sharer_stub = pb_grpc.SharerStub(grpc.insecure_channel(f"127.0.0.1:{self.sharer_port}"))

    def stop(self):
        self.sharer_running.stop(1)
        self.receiver_running.stop(1)


def make_adapter_dir(tiny_pair, tmp_path_factory, mode, **options):
    (ms, ts), (mr, tr) = tiny_pair
    adapter = LatentAdapter.for_models(
        mode, model_identity(ms, ts), model_identity(mr, tr), bottleneck=16, slots=4, **options
    )
    torch.manual_seed(3)
    for name, p in adapter.named_parameters():  # make the latents matter to the answer
        if name.endswith("up.weight") or name.startswith(("encoder.proj", "decoder.proj")):
            torch.nn.init.normal_(p, std=0.3)
    return adapter.save_pretrained(tmp_path_factory.mktemp(f"adapter-{mode}"))


@pytest.fixture(scope="module")
def spans():
    return InMemorySpanExporter()


@pytest.fixture(scope="module", params=["lcf", "lcfx"])
def pair(request, tiny_pair, tmp_path_factory, spans):
    running = Pair(
        tiny_pair, make_adapter_dir(tiny_pair, tmp_path_factory, request.param), request.param, spans
    )
    yield running
    running.stop()


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


def test_span_packet_lcfx_through_both_services(tiny_pair, tmp_path_factory, spans):
    """A span-packet LCF-X adapter (lcflow.adapter.spans): the sharer selects with the request's
    prompt, at most m rows travel, and the answer is the in-process one."""
    adapter_dir = make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx", packet="spans")
    running = Pair(tiny_pair, adapter_dir, "lcfx", spans)
    try:
        result = running.client.handoff(
            PROMPT, mode="lcfx", context=CONTEXT, receiver_context=RECEIVER_CONTEXT, max_new_tokens=6
        )
        assert result.answer == in_process_answer(tiny_pair, adapter_dir, "lcfx", 6)
        layers = len(tiny_pair[1][0].config.layer_types)
        assert 0 < result.summary.bytes_raw <= layers * 4 * 16 * 2  # m=4 rows of b=16 bf16 per layer
    finally:
        running.stop()


def test_text_channels_through_both_services(tiny_pair, tmp_path_factory, spans):
    """TEXT on each channel: the note, the context forwarded, and the sentences the span adapter
    selects forwarded; each answer is the in-process one, and bytes_wire is the text sent. A slot
    adapter has no sentences to forward: FAILED_PRECONDITION; an unknown channel: INVALID_ARGUMENT."""
    from lcflow.handoff.generation import GenerationSettings
    from lcflow.handoff.pair import Receiver, Sharer, reader_contexts

    (ms, ts), (mr, tr) = tiny_pair
    adapter_dir = make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx", packet="spans")
    running = Pair(tiny_pair, adapter_dir, "lcfx", spans)
    adapter = LatentAdapter.from_pretrained(adapter_dir)
    sharer, receiver = Sharer(ms, ts, adapter.encoder, adapter.config), Receiver(mr, tr)
    document = " ".join(
        f"{name} lives in {city}." for name, city in zip("ABCDEFGH", ["Oslo", "Rome"] * 4, strict=True)
    )
    try:
        selected = sharer.selected_text(sharer.prefill(document), PROMPT)
        for channel, sent in (("forward", document), ("forward-selected", selected)):
            result = running.client.handoff(
                PROMPT, mode="text", text_channel=channel, context=document,
                receiver_context=RECEIVER_CONTEXT, max_new_tokens=5,
            )  # fmt: skip
            prepared = receiver.prepare_plain(PROMPT, reader_contexts(sent, RECEIVER_CONTEXT))
            assert result.answer == receiver.generate(prepared, GenerationSettings(5))
            assert result.summary.bytes_wire == len(sent.encode()) > 0
            assert result.summary.timings.HasField("select") == (channel == "forward-selected")
            assert result.summary.adapter == ("" if channel == "forward" else adapter_dir.name)
        assert 0 < len(selected) < len(document)  # a selection (4 positions), not the whole document
        note = running.client.handoff(PROMPT, mode="text", context=CONTEXT, max_new_tokens=5)
        assert note.summary.timings.message_generate > 0 and not note.summary.timings.HasField("select")
        request = running.client.request(PROMPT, mode="text", context=CONTEXT)
        request.text_channel = 7
        with pytest.raises(grpc.RpcError) as err:
            list(running.sharer_stub.Handoff(request, timeout=30))
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text_channel 7" in err.value.details()
        )
    finally:
        running.stop()
    slots = Pair(tiny_pair, make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"), "lcfx", spans)
    try:
        with pytest.raises(grpc.RpcError) as err:
            slots.client.handoff(PROMPT, mode="text", text_channel="forward-selected", context=CONTEXT)
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "packs slots" in err.value.details()
        )
    finally:
        slots.stop()


def test_a_text_reader_reads_forwarded_text_on_the_receiver(tiny_pair, tmp_path_factory, spans):
    """TEXT with text_reader: the receiver reads the forwarded sentences with the named reader (a
    LoRA copy of its model) and answers as the reader does in-process; a reader is refused on
    latents or a note, for another channel, or when the name is not a reader."""
    from lcflow.adapter.reader import TextReader
    from lcflow.handoff.generation import GenerationSettings
    from lcflow.handoff.pair import Receiver, Sharer, reader_contexts

    (ms, ts), (mr, tr) = tiny_pair
    root = tmp_path_factory.mktemp("with-reader")
    spans_dir = make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx", packet="spans")
    LatentAdapter.from_pretrained(spans_dir).save_pretrained(root / "spans")
    reader = TextReader.for_model(mr, tr, "forward-selected", rank=4)
    torch.manual_seed(5)
    for name, weight in reader.model.named_parameters():
        if "lora_B" in name:  # a trained reader: it reads otherwise than the receiver
            torch.nn.init.normal_(weight, std=0.5)
    reader.save_pretrained(root / "reader")
    running = Pair(tiny_pair, root / "spans", "lcfx", spans, adapters=str(root))
    try:
        adapter = LatentAdapter.from_pretrained(root / "spans")
        selected = Sharer(ms, ts, adapter.encoder, adapter.config).selected_text(
            Sharer(ms, ts, adapter.encoder, adapter.config).prefill(CONTEXT), PROMPT
        )
        options = dict(mode="text", text_channel="forward-selected", context=CONTEXT, max_new_tokens=5)
        options["receiver_context"] = RECEIVER_CONTEXT
        read = running.client.handoff(PROMPT, text_reader="reader", **options)
        loaded = Receiver(TextReader.from_pretrained(root / "reader", mr, tr).model, tr)
        prepared = loaded.prepare_plain(PROMPT, reader_contexts(selected, RECEIVER_CONTEXT))
        assert read.answer == loaded.generate(prepared, GenerationSettings(5))
        plain = running.client.handoff(PROMPT, **options)
        assert plain.answer != read.answer  # the reader was used, not the plain receiver
        assert running.receiver_service.readers.loaded() == ["reader"]
        refused = [
            ({"mode": "lcfx", "context": CONTEXT}, "reader", grpc.StatusCode.INVALID_ARGUMENT),
            ({"mode": "text", "context": CONTEXT}, "reader", grpc.StatusCode.INVALID_ARGUMENT),  # a note
            ({**options, "text_channel": "forward"}, "reader", grpc.StatusCode.FAILED_PRECONDITION),
            (options, "nobody", grpc.StatusCode.NOT_FOUND),
            (options, "spans", grpc.StatusCode.FAILED_PRECONDITION),
            (options, "../reader", grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for request_options, name, code in refused:
            with pytest.raises(grpc.RpcError) as err:
                running.client.handoff(PROMPT, text_reader=name, **request_options)
            assert err.value.code() == code, (name, request_options, err.value.details())
        listed = {a.name: a for a in running.client.list_adapters().adapters}
        assert listed["reader"].mode == "text-reader" and "text_reader" in listed["reader"].reason
    finally:
        running.stop()


# --- every mode --------------------------------------------------------------------------------


def test_latent_handoff_streams_the_same_answer_as_in_process(pair, tiny_pair):
    result = pair.client.handoff(
        PROMPT, mode=pair.mode, context=CONTEXT, receiver_context=RECEIVER_CONTEXT, max_new_tokens=6
    )
    assert result.deltas and "".join(result.deltas) == result.answer
    expected = in_process_answer(tiny_pair, pair.adapter_dir, pair.mode, 6)
    assert result.answer == expected


@pytest.mark.parametrize("mode", ["text", "none"])
def test_text_and_receiver_alone_modes(pair, mode):
    result = pair.client.handoff(
        PROMPT, mode=mode, context=CONTEXT, receiver_context=RECEIVER_CONTEXT, max_new_tokens=5
    )
    assert "".join(result.deltas) == result.answer and result.summary.mode == pb.Mode.Value(mode.upper())
    for latent_stage in ("encode", "pack", "transfer", "unpack", "decode_kv"):  # did not run: unset
        assert not result.summary.timings.HasField(latent_stage), latent_stage
    if mode == "text":  # the message travels as text: its bytes are what was sent
        assert result.summary.timings.message_generate > 0
        assert result.summary.bytes_wire == result.summary.bytes_raw
    else:
        assert result.summary.bytes_wire == 0


def test_stage_timings_are_present_and_add_up(pair):
    result = pair.client.handoff(
        PROMPT, mode=pair.mode, context=CONTEXT, receiver_context=RECEIVER_CONTEXT, max_new_tokens=4
    )
    t = result.summary.timings
    for stage in (
        "sharer_prefill",
        "encode",
        "pack",
        "unpack",
        "decode_kv",
        "receiver_prefill",
        "time_to_first_token",
        "total",
    ):
        assert getattr(t, stage) > 0, stage
    # Transfer on loopback can round to 0 ms; it is still reported, as a stage that ran.
    assert t.HasField("transfer") and t.transfer >= 0
    sharer_side = t.sharer_prefill + t.encode + t.pack + t.transfer + t.unpack
    # LCF: the receiver prefills its [context + prompt] while the sharer's side runs (overlapped);
    # LCF-X: it prefills after the packet arrived, its input comes after the packet's entries
    overlapped = pair.mode == "lcf"
    receiver_side = t.receiver_prefill + t.decode_kv
    before_first_token = (
        max(sharer_side, t.receiver_prefill) + t.decode_kv if overlapped else sharer_side + receiver_side
    )
    assert before_first_token <= t.time_to_first_token + 1.0  # stages up to the first token fit inside it
    assert t.time_to_first_token <= t.total
    assert result.summary.tokens.context > 0 and result.summary.tokens.generated > 0


def test_one_trace_spans_client_sharer_and_receiver(pair, spans):
    spans.clear()
    result = pair.client.handoff(PROMPT, mode=pair.mode, context=CONTEXT, max_new_tokens=3)
    by_name = trace_spans(spans, result.summary.trace_id)
    root = by_name[("client", "client.handoff")]
    client_call = by_name[("client", "/lcflow.v1.Sharer/Handoff")]
    sharer_server = by_name[("lcflow-sharer", "/lcflow.v1.Sharer/Handoff")]
    sharer_call = by_name[("lcflow-sharer", "/lcflow.v1.Receiver/Receive")]
    receiver_server = by_name[("lcflow-receiver", "/lcflow.v1.Receiver/Receive")]
    assert client_call.parent.span_id == root.context.span_id
    assert sharer_server.parent.span_id == client_call.context.span_id
    assert sharer_call.parent.span_id == sharer_server.context.span_id
    assert receiver_server.parent.span_id == sharer_call.context.span_id
    stream = by_name[("lcflow-sharer", "sharer.stream")]
    assert stream.parent.span_id == sharer_server.context.span_id
    # LCF: the context is prefilled by the stream, once the request is on its way to the receiver
    # (which prefills its own meanwhile); LCF-X: before the call, as the receiver can only wait
    prefill_parent = stream if pair.mode == "lcf" else sharer_server
    assert by_name[("lcflow-sharer", "sharer.prefill")].parent.span_id == prefill_parent.context.span_id
    receiver_spans = ["receiver.unpack", "receiver.prefill", "receiver.generate"]
    if pair.mode == "lcf":  # its own [context + prompt], prefilled while the latents travel
        receiver_spans.append("receiver.prefill_overlapped")
    for name in receiver_spans:
        assert by_name[("lcflow-receiver", name)].parent.span_id == receiver_server.context.span_id
    unpack = by_name[("lcflow-receiver", "receiver.unpack")]
    # bytes on the wire: what the sharer sent is what the receiver counted, and what the client was told
    assert (
        stream.attributes["lcflow.bytes.wire"]
        == unpack.attributes["lcflow.bytes.wire"]
        == result.summary.bytes_wire
    )
    assert stream.attributes["lcflow.chunks"] == unpack.attributes["lcflow.chunks"] == result.summary.chunks
    assert stream.attributes["lcflow.bytes.raw"] == result.summary.bytes_raw > 0


def test_sessions_reuse_the_prefill_and_expire_to_not_found(pair):
    opened = pair.client.open_session(CONTEXT)
    assert opened.tokens > 0
    reused = pair.client.handoff(
        PROMPT,
        mode=pair.mode,
        session_id=opened.session_id,
        receiver_context=RECEIVER_CONTEXT,
        max_new_tokens=5,
    )
    fresh = pair.client.handoff(
        PROMPT, mode=pair.mode, context=CONTEXT, receiver_context=RECEIVER_CONTEXT, max_new_tokens=5
    )
    assert reused.answer == fresh.answer
    assert reused.summary.timings.sharer_prefill == 0 < fresh.summary.timings.sharer_prefill
    assert pair.client.close_session(opened.session_id)
    with pytest.raises(grpc.RpcError) as err:
        pair.client.handoff(PROMPT, mode=pair.mode, session_id=opened.session_id, max_new_tokens=3)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- bad input: exact status, and the service still serves the next request ---------------------


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


def chunk_positions(messages) -> list[int]:
    return [i for i, m in enumerate(messages) if m.WhichOneof("message") == "chunk"]


def damage_version(messages):
    header_of(messages).format_version = 99


def damage_adapter(messages):
    header_of(messages).adapter_id = "lcf:0000000000000000"


def damage_receiver_model(messages):
    header_of(messages).receiver_id = "someone-else@aaaa.bbbb"


def damage_flip_byte(messages):
    chunk = messages[chunk_positions(messages)[1]].chunk
    chunk.payload = bytes([chunk.payload[0] ^ 0xFF]) + chunk.payload[1:]


def damage_missing_chunk(messages):
    del messages[chunk_positions(messages)[1]]


def damage_duplicated_chunk(messages):
    position = chunk_positions(messages)[1]
    messages.insert(position, messages[position])


def damage_reordered_chunks(messages):
    a, b = chunk_positions(messages)[:2]
    messages[a], messages[b] = messages[b], messages[a]


def damage_truncated(messages):
    del messages[-2:]  # the last chunk and the trailer never come


def damage_bomb(messages):
    """The first segment's chunks replaced by one that inflates to 256 MiB."""
    header = header_of(messages)
    first = chunk_positions(messages)
    payload = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(bytes(256 << 20))
    segment0 = [i for i in first if messages[i].chunk.segment == 0]
    for i in reversed(segment0[1:]):
        del messages[i]
    messages[segment0[0]] = pb.LatentMessage(
        chunk=pb.LatentChunk(segment=0, payload=payload, crc32=zlib.crc32(payload), last_in_segment=True)
    )
    for sequence, i in enumerate(chunk_positions(messages)):  # a well-numbered stream: only the bomb is wrong
        messages[i].chunk.sequence = sequence
    header.codec.chunk_size = 1 << 20
    assert header.total_raw_bytes < 1 << 20 and len(payload) < 1 << 20


def damage_malformed_safetensors(messages):
    """An uncompressed stream whose first segment is not a safetensors blob at all."""
    header = header_of(messages)
    spec = header.segments[0].tensors[0]
    blob = (16).to_bytes(8, "little") + b"not json at all!" + bytes(64)
    writer = PacketWriter(
        mode="lcfx",
        adapter_id=header.adapter_id,
        sharer_id=header.sharer_id,
        receiver_id=header.receiver_id,
        layer_specs={header.segments[0].layer: {"latent": TensorSpec(spec.dtype, tuple(spec.shape))}},
        codec=CodecConfig(name="none"),
    )
    chunk = pb.LatentChunk(sequence=0, segment=0, payload=blob, crc32=zlib.crc32(blob), last_in_segment=True)
    trailer = pb.LatentTrailer(total_chunks=1, crc32=zlib.crc32(blob), total_wire_bytes=len(blob))
    request = messages[0].request
    request.mode = pb.LCF_X
    messages[:] = [
        messages[0],
        writer.header(),
        pb.LatentMessage(chunk=chunk),
        pb.LatentMessage(trailer=trailer),
    ]


@pytest.mark.parametrize(
    "damage, code",
    [
        (damage_version, grpc.StatusCode.FAILED_PRECONDITION),
        (damage_adapter, grpc.StatusCode.FAILED_PRECONDITION),
        (damage_receiver_model, grpc.StatusCode.FAILED_PRECONDITION),
        (damage_flip_byte, grpc.StatusCode.DATA_LOSS),
        (damage_missing_chunk, grpc.StatusCode.DATA_LOSS),
        (damage_duplicated_chunk, grpc.StatusCode.DATA_LOSS),
        (damage_reordered_chunks, grpc.StatusCode.DATA_LOSS),
        (damage_truncated, grpc.StatusCode.DATA_LOSS),
        (damage_bomb, grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)).removeprefix("damage_"),
)
def test_bad_latent_streams_get_their_status(pair, damage, code):
    messages = latent_messages(pair)
    assert len(chunk_positions(messages)) >= 3
    damage(messages)
    assert receive_status(pair, messages) == code
    still_serves(pair)


def test_malformed_safetensors_is_invalid_argument(pair):
    if pair.mode != "lcfx":
        pytest.skip("built as an LCF-X stream")
    messages = latent_messages(pair)
    damage_malformed_safetensors(messages)
    assert receive_status(pair, messages) == grpc.StatusCode.INVALID_ARGUMENT
    still_serves(pair)


def test_identity_mismatch_names_both(pair):
    messages = latent_messages(pair)
    damage_adapter(messages)
    with pytest.raises(grpc.RpcError) as err:
        list(pair.receiver_stub.Receive(iter(messages), timeout=30))
    assert (
        "lcf:0000000000000000" in err.value.details()
        and pair.receiver_service.engine.adapter_id in err.value.details()
    )


@pytest.mark.parametrize(
    "options",
    [
        {"prompt": "   ", "context": CONTEXT},
        {"prompt": PROMPT, "context": ""},
        {"prompt": "x" * 40_000, "context": CONTEXT},
        {"prompt": PROMPT, "context": "word " * 5000},
        {"prompt": PROMPT, "context": CONTEXT, "max_new_tokens": 100_000},
    ],
    ids=["empty-prompt", "empty-context", "oversized-prompt", "oversized-context", "too-many-tokens"],
)
def test_bad_requests_are_invalid_argument(pair, options):
    options = dict(options)  # the parameter dict is shared between the lcf and lcfx runs
    prompt = options.pop("prompt")
    with pytest.raises(grpc.RpcError) as err:
        pair.client.handoff(prompt, mode=pair.mode, **options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details()) > 20  # says what was wrong
    still_serves(pair)


def test_an_unknown_mode_number_is_named_with_the_valid_modes(pair):
    """Mode 99 is not unset: the status says which number was sent and which modes exist, on the
    sharer and on the receiver (which a sharer of another version may call directly)."""
    for mode, said in ((99, "mode 99 is not a mode"), (0, "mode is unset")):
        request = pair.client.request(PROMPT, mode="none")
        request.mode = mode
        with pytest.raises(grpc.RpcError) as err:
            list(pair.sharer_stub.Handoff(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert said in err.value.details() and "LCF_X (2)" in err.value.details()
    opening = plain_request(pb.NONE)
    opening.request.mode = 99
    events, code, details = receive_events(pair, [opening])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "mode 99" in details and events == []
    still_serves(pair)


def test_a_chat_role_outside_the_templates_roles_is_refused(pair):
    good = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPT)])
    request = pair.client.request(PROMPT, mode="none")
    request.prompt_messages.CopyFrom(good)
    assert list(pair.sharer_stub.Handoff(request, timeout=30))[-1].HasField("summary")
    for role in ("wizard", ""):
        bad = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="Be brief.")])
        bad.messages.append(pb.ChatMessage(role=role, content=PROMPT))
        request.prompt_messages.CopyFrom(bad)
        with pytest.raises(grpc.RpcError) as err:
            list(pair.sharer_stub.Handoff(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert f"prompt_messages[1] has role {role!r}" in details and "system, user, assistant" in details
    still_serves(pair)


def test_deadline_exceeded_stops_the_handoff(pair):
    client = HandoffClient(f"127.0.0.1:{pair.sharer_port}", timeout_s=0.3)
    with pytest.raises(grpc.RpcError) as err:
        client.handoff(PROMPT, mode=pair.mode, context=CONTEXT * 20, max_new_tokens=2000)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    still_serves(pair)


def test_stream_must_open_with_a_request(pair):
    messages = latent_messages(pair)
    assert receive_status(pair, messages[1:]) == grpc.StatusCode.INVALID_ARGUMENT


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_client_cancellation_stops_the_receiver(pair):
    events = pair.sharer_stub.Handoff(
        pair.client.request(PROMPT, mode=pair.mode, context=CONTEXT, max_new_tokens=2000), timeout=60
    )
    first = next(events)
    assert first.HasField("text")
    assert pair.receiver_service.limit.in_flight == 1
    cancelled_before = pair.receiver_service.cancelled_generations
    events.cancel()
    # the receiver's generation is stopped early (not run to 2000 tokens) and its slot freed
    assert wait_until(lambda: pair.receiver_service.cancelled_generations == cancelled_before + 1, 10)
    assert wait_until(lambda: pair.receiver_service.limit.in_flight == 0, 10)
    assert wait_until(lambda: pair.sharer_service.limit.in_flight == 0, 10)
    still_serves(pair)


def pushback_ms(err: grpc.RpcError) -> int | None:
    hint = dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    return int(hint) if hint is not None else None


def one_slot_pair(tiny_pair, tmp_path_factory, spans) -> Pair:
    """Both services with one handoff at a time and no queue: a second one is refused at once."""
    adapter_dir = make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx")
    return Pair(tiny_pair, adapter_dir, "lcfx", spans, max_concurrent=1, max_queue=0)


def test_without_a_queue_the_bound_gives_resource_exhausted_with_a_retry_hint(
    tiny_pair, tmp_path_factory, spans
):
    bounded = one_slot_pair(tiny_pair, tmp_path_factory, spans)
    client = HandoffClient(f"127.0.0.1:{bounded.sharer_port}", timeout_s=30, retries=0)
    try:
        # Hold the one slot as an in-flight handoff would (deterministic: a real one may finish
        # before the second request arrives, since a tiny model can stop at EOS at any time).
        with bounded.sharer_service.limit.slot():
            with pytest.raises(grpc.RpcError) as err:
                client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent" in err.value.details() and "--max-queue" in err.value.details()
        assert 50 <= pushback_ms(err.value) <= 10_000
        assert client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2).summary.timings.total > 0
        with bounded.receiver_service.limit.slot():  # the receiver has its own bound, and its hint travels
            with pytest.raises(grpc.RpcError) as err:
                client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details().startswith("receiver:") and pushback_ms(err.value) is not None
    finally:
        client.close()
        bounded.stop()


@pytest.fixture
def queued(tiny_pair, tmp_path_factory, spans):
    """One slot and a queue of two on each service."""
    running = Pair(
        tiny_pair,
        make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"),
        "lcfx",
        spans,
        max_concurrent=1,
        max_queue=2,
    )
    yield running
    running.stop()


def hold_slot(limit, seconds: float):
    """Hold one of `limit`'s slots from another thread for `seconds`; returns (thread, held event)."""
    import threading

    held = threading.Event()

    def hold():
        with limit.slot():
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return thread


def test_a_burst_waits_in_the_queue_and_is_served(queued, spans):
    spans.clear()
    holder = hold_slot(queued.sharer_service.limit, 0.6)
    client = HandoffClient(f"127.0.0.1:{queued.sharer_port}", timeout_s=30, retries=0)
    result = client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)  # waits, then runs
    holder.join()
    t = result.summary.timings
    assert t.HasField("queue") and t.queue >= 300  # it waited for the held slot, and says so
    assert t.time_to_first_token >= t.queue and t.total >= t.queue
    names = {s.name for s in spans.get_finished_spans()}
    assert {"sharer.queue", "receiver.queue"} <= names
    fresh = client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)  # nothing to wait for
    assert fresh.summary.timings.HasField("queue") and fresh.summary.timings.queue < 100
    client.close()


def test_a_full_queue_is_refused_at_once_and_the_queued_are_served(queued):
    from concurrent.futures import ThreadPoolExecutor

    limit = queued.sharer_service.limit
    holder = hold_slot(limit, 1.5)
    client = HandoffClient(f"127.0.0.1:{queued.sharer_port}", timeout_s=30, retries=0)
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(client.handoff, PROMPT, context=CONTEXT, max_new_tokens=2) for _ in range(2)]
        assert wait_until(lambda: limit.queued == 2, 10)
        with pytest.raises(grpc.RpcError) as err:
            client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback_ms(err.value) >= 50
        results = [future.result(timeout=60) for future in waiting]
    holder.join()
    assert all(r.summary.timings.queue > 0 for r in results)
    assert limit.queued == 0 and limit.in_flight == 0
    client.close()


def test_a_deadline_ends_the_wait_in_the_queue(queued):
    limit = queued.sharer_service.limit
    holder = hold_slot(limit, 1.5)
    client = HandoffClient(f"127.0.0.1:{queued.sharer_port}", timeout_s=0.4, retries=0)
    with pytest.raises(grpc.RpcError) as err:
        client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: limit.queued == 0, 5)  # its place in the queue is given up
    holder.join()
    client.close()


def test_the_client_retries_a_full_queue_with_grpc_retries(tiny_pair, tmp_path_factory, spans):
    bounded = one_slot_pair(tiny_pair, tmp_path_factory, spans)
    try:
        holder = hold_slot(bounded.sharer_service.limit, 0.5)
        started = time.monotonic()
        for retries, expected in ((0, grpc.StatusCode.RESOURCE_EXHAUSTED), (3, grpc.StatusCode.OK)):
            client = HandoffClient(f"127.0.0.1:{bounded.sharer_port}", timeout_s=30, retries=retries)
            try:
                client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            client.close()
            assert code == expected, retries
        assert time.monotonic() - started >= 0.3  # the retried call got through after the slot freed
        holder.join()
    finally:
        bounded.stop()


class SlowRelease(ConcurrencyLimit):
    """A limit whose slots take `delay_s` to come free after the work is done, as on a loaded
    machine where the handler's thread is scheduled late."""

    def __init__(self, limit: int, max_queue: int, delay_s: float):
        super().__init__(limit, max_queue)
        self.delay_s = delay_s

    @contextlib.contextmanager
    def slot(self, context=None):
        with super().slot(context) as waited_ms:
            try:
                yield waited_ms
            finally:
                time.sleep(self.delay_s)


def test_a_client_may_send_its_next_request_as_soon_as_it_sees_the_summary(
    tiny_pair, tmp_path_factory, spans
):
    """The summary is sent only once the slot is free (on both services), so a client that stops
    reading at the summary and sends its next request at once is never refused, even with one
    slot and no queue. (Sent inside the slot, the summary would reach the client while the slot
    is still held: RESOURCE_EXHAUSTED here every time.)"""
    bounded = one_slot_pair(tiny_pair, tmp_path_factory, spans)
    bounded.sharer_service.limit = SlowRelease(1, 0, delay_s=0.5)
    bounded.receiver_service.limit = SlowRelease(1, 0, delay_s=0.5)
    client = HandoffClient(f"127.0.0.1:{bounded.sharer_port}", timeout_s=30, retries=0)
    try:
        for _ in range(2):
            calls = [
                lambda: client.stream(PROMPT, context=CONTEXT, max_new_tokens=2),
                lambda: bounded.receiver_stub.Receive(iter([plain_request(pb.NONE)]), timeout=30),
            ]
            for call in calls:
                events = call()
                for event in events:  # stop at the summary: do not wait for the call's status
                    if event.HasField("summary"):
                        break
                else:
                    pytest.fail("the stream ended without a summary")
    finally:
        client.close()
        bounded.stop()


def test_graceful_shutdown_finishes_in_flight_handoffs(tiny_pair, tmp_path_factory, spans):
    import threading

    stopping = Pair(tiny_pair, make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"), "lcfx", spans)
    events = stopping.sharer_stub.Handoff(
        stopping.client.request(PROMPT, context=CONTEXT, max_new_tokens=300), timeout=60
    )
    next(events)
    stopper = threading.Thread(target=stopping.sharer_running.stop, args=(30,))
    stopper.start()
    rest = list(events)  # the in-flight handoff runs to its summary
    stopper.join(30)
    assert rest[-1].HasField("summary") and rest[-1].summary.tokens.generated > 1
    with pytest.raises(grpc.RpcError) as err:  # and new work is refused
        stopping.client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stopping.receiver_running.stop(1)


def test_health_is_not_serving_until_the_model_loads(tiny_dir, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lcflow.serving.receiver import serve

    port = free_port()

    running, service = serve(
        ServiceConfig("receiver", model=str(tiny_dir("gemma3", 400, 2)), port=port),
        make_tracer_provider("lcflow-receiver", InMemorySpanExporter()),
    )
    try:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        first = stub.Check(health_pb2.HealthCheckRequest(service="lcflow.v1.Receiver"), timeout=5).status
        assert wait_until(lambda: service.engine is not None, 60)
        time.sleep(0.1)
        after = stub.Check(health_pb2.HealthCheckRequest(service="lcflow.v1.Receiver"), timeout=5).status
        assert first == health_pb2.HealthCheckResponse.NOT_SERVING or service.engine is not None
        assert after == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(1)


def test_reflection_lists_the_services_when_enabled(tiny_pair, tmp_path_factory, spans):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflecting = Pair(
        tiny_pair, make_adapter_dir(tiny_pair, tmp_path_factory, "lcfx"), "lcfx", spans, reflection=True
    )
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(
            grpc.insecure_channel(f"127.0.0.1:{reflecting.sharer_port}")
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {"lcflow.v1.Sharer", "grpc.health.v1.Health"} <= names
    finally:
        reflecting.stop()


def test_reflection_is_off_by_default(pair):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(f"127.0.0.1:{pair.sharer_port}"))
    with pytest.raises(grpc.RpcError) as err:
        next(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_service_logs_carry_the_trace_id(pair, caplog):
    import logging

    from lcflow.serving.telemetry import TraceIdLogFilter

    handler_records = []

    class Collect(logging.Handler):
        def emit(self, record):
            handler_records.append(record)

    collector = Collect()
    collector.addFilter(TraceIdLogFilter())
    logger = logging.getLogger("lcflow.serving.server")
    logger.addHandler(collector)
    try:
        with pytest.raises(grpc.RpcError):
            pair.client.handoff("   ", mode=pair.mode, context=CONTEXT)  # refused: logged with its trace
    finally:
        logger.removeHandler(collector)
    refused = [r for r in handler_records if "refused" in r.getMessage()]
    assert refused and all(len(r.trace_id) == 32 for r in refused)


def test_latent_modes_without_an_adapter_are_failed_precondition(tiny_pair, spans):
    (ms, ts), (mr, tr) = tiny_pair
    receiver_port, sharer_port = free_port(), free_port()
    receiver_running, _ = serve_receiver(
        ServiceConfig("receiver", model="tiny", port=receiver_port),
        make_tracer_provider("lcflow-receiver", spans),
        ReceiverEngine.from_loaded(mr, tr, ""),
    )
    sharer_running, _ = serve_sharer(
        ServiceConfig("sharer", model="tiny", port=sharer_port, receiver=f"127.0.0.1:{receiver_port}"),
        make_tracer_provider("lcflow-sharer", spans),
        SharerEngine.from_loaded(ms, ts, ""),
    )
    try:
        client = HandoffClient(f"127.0.0.1:{sharer_port}", timeout_s=30)
        for mode in ("lcf", "lcfx"):
            with pytest.raises(grpc.RpcError) as err:
                client.handoff(PROMPT, mode=mode, context=CONTEXT, max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no adapter" in err.value.details() and "--adapter" in err.value.details()
        assert client.handoff(PROMPT, mode="text", context=CONTEXT, max_new_tokens=2).summary.mode == pb.TEXT
    finally:
        sharer_running.stop(1)
        receiver_running.stop(1)


def test_a_refused_handoff_leaves_no_sharer_work_running(tiny_pair, tmp_path_factory):
    """The sharer prefills inside the latent stream once the request is out (to overlap with the
    receiver's prefill); when the receiver refuses at once (here it has no LCF adapter), the
    handoff ends FAILED_PRECONDITION and only after the stream's torch work has stopped: no
    sharer span of that handoff ends after its Handoff span."""
    (ms, ts), (mr, tr) = tiny_pair
    exporter = InMemorySpanExporter()
    receiver_port, sharer_port = free_port(), free_port()
    receiver_running, _ = serve_receiver(
        ServiceConfig("receiver", model="tiny", port=receiver_port),
        make_tracer_provider("lcflow-receiver", exporter),
        ReceiverEngine.from_loaded(mr, tr, ""),
    )
    adapter_dir = make_adapter_dir(tiny_pair, tmp_path_factory, "lcf")
    sharer_running, _ = serve_sharer(
        ServiceConfig("sharer", model="tiny", port=sharer_port, receiver=f"127.0.0.1:{receiver_port}"),
        make_tracer_provider("lcflow-sharer", exporter),
        SharerEngine.from_loaded(ms, ts, str(adapter_dir)),
    )
    try:
        client = HandoffClient(f"127.0.0.1:{sharer_port}", timeout_s=30)
        with pytest.raises(grpc.RpcError) as err:
            client.handoff(PROMPT, mode="lcf", context=CONTEXT, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "no adapter" in err.value.details()
    finally:
        sharer_running.stop(1)
        receiver_running.stop(1)
    sharer_spans = [
        s for s in exporter.get_finished_spans() if s.resource.attributes["service.name"] == "lcflow-sharer"
    ]
    handoff = next(s for s in sharer_spans if s.name == "/lcflow.v1.Sharer/Handoff")
    mine = [s for s in sharer_spans if s.context.trace_id == handoff.context.trace_id and s is not handoff]
    assert all(s.end_time <= handoff.end_time for s in mine), [
        (s.name, s.end_time - handoff.end_time) for s in mine
    ]


# --- strict streams: nothing the receiver did not ask for, every shape checked first ------------


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


@pytest.mark.parametrize("mode", [pb.NONE, pb.TEXT])
@pytest.mark.parametrize("follows", ["header", "request", "trailer"])
def test_nothing_may_follow_a_plain_request(pair, mode, follows):
    latent = latent_messages(pair)
    extra = {"header": latent[1], "request": plain_request(mode), "trailer": latent[-1]}[follows]
    assert receive_events(pair, [plain_request(mode)])[1] == grpc.StatusCode.OK  # alone, it is served
    events, code, details = receive_events(pair, [plain_request(mode), extra])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{follows} message arrived after a {pb.Mode.Name(mode)} ReceiverRequest" in details
    assert events == []  # refused before anything was generated
    still_serves(pair)


def test_a_second_request_inside_the_payload_is_invalid(pair):
    messages = latent_messages(pair)
    messages.insert(3, messages[0])  # after the header and a chunk
    events, code, details = receive_events(pair, messages)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "second ReceiverRequest" in details
    assert events == []
    still_serves(pair)


@pytest.mark.parametrize("follows", ["chunk", "request", "header", "trailer"])
def test_nothing_may_follow_the_trailer(pair, follows):
    messages = latent_messages(pair)
    extra = {"chunk": messages[2], "request": messages[0], "header": messages[1], "trailer": messages[-1]}
    events, code, details = receive_events(pair, [*messages, extra[follows]])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{follows} message arrived after the LatentTrailer" in details
    assert events == []
    still_serves(pair)


def test_a_latent_request_without_a_header_is_invalid(pair):
    messages = latent_messages(pair)
    events, code, details = receive_events(pair, [messages[0], messages[2]])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must send its LatentHeader" in details
    events, code, details = receive_events(pair, messages[:1])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not the end of the stream" in details


def bad_rows(pair, header):
    rows = 5000 if pair.mode == "lcf" else 5  # lcf: above --max-context-tokens; lcfx: not the 4 slots
    for i, segment in enumerate(header.segments):
        if segment.HasField("layer"):
            set_shape(header, i, (1, rows, segment.tensors[0].shape[2]))
        else:
            set_shape(header, i, (rows, 2))
    return "--max-context-tokens" if pair.mode == "lcf" else "pools into 4 slots"


def bad_bottleneck(pair, header):
    set_shape(header, 0, (1, header.segments[0].tensors[0].shape[1], 17))
    return "does not fit this adapter"


def bad_layers(pair, header):
    header.segments[0].layer = header.layers[0] = 7
    return "but this receiver's adapter decodes layers"


def bad_mode(pair, header):
    header.mode = pb.LCF_X if pair.mode == "lcf" else pb.LCF
    return "the request asked for"


def bad_tensor_name(pair, header):
    header.segments[0].tensors[0].name = "keys"
    return "expected one float tensor 'latent'"


def bad_spans(pair, header):
    if pair.mode == "lcfx":  # LCF-X carries no shared segment at all
        header.segments.add(tensors=[pb.TensorSpec(name="token_spans", dtype="int32", shape=[4, 2])])
        set_shape(header, len(header.segments) - 1, (4, 2))
        return "carries no shared tensors"
    shared = next(i for i, s in enumerate(header.segments) if not s.HasField("layer"))
    set_shape(header, shared, (3, 2))
    return "LCF needs one int32 token_spans"


@pytest.mark.parametrize(
    "damage",
    [bad_rows, bad_bottleneck, bad_layers, bad_mode, bad_tensor_name, bad_spans],
    ids=lambda f: f.__name__,
)
def test_header_shapes_must_fit_the_adapter(pair, damage):
    """Each header is self-consistent (the wire format accepts it) but declares tensors this
    receiver's decoder cannot take: refused from the header alone, before any chunk is read."""
    messages = latent_messages(pair)
    expected = damage(pair, header_of(messages))
    # Only the request and header: were the header accepted, the receiver would go on to wait for
    # chunks and end with DATA_LOSS, not INVALID_ARGUMENT.
    events, code, details = receive_events(pair, messages[:2])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expected in details
    assert events == []
    still_serves(pair)


# --- content stays out of logs and traces -------------------------------------------------------

SECRET_CONTEXT = "Zorblax Quintero keeps the violet key under the mossy stone."
SECRET_PROMPT = "Where does Zorblax Quintero keep the violet key?"
SECRET_RECEIVER_CONTEXT = "Yusra Okonkwo-Lindqvist owns an amber kite."


@pytest.mark.parametrize("log_content", [False, True], ids=["default", "log-content"])
def test_prompts_and_contexts_stay_out_of_logs_and_spans_unless_asked(pair, spans, caplog, log_content):
    import logging

    configs = (pair.sharer_service.config, pair.receiver_service.config)
    spans.clear()
    caplog.set_level(logging.DEBUG)
    for config in configs:
        config.log_content = log_content
    try:
        results = [
            pair.client.handoff(
                SECRET_PROMPT,
                mode=mode,
                context=SECRET_CONTEXT,
                receiver_context=SECRET_RECEIVER_CONTEXT,
                max_new_tokens=3,
            )
            for mode in (pair.mode, "text", "none")
        ]
        with pytest.raises(grpc.RpcError) as err:  # refused: its error message must not echo it either
            pair.client.handoff(SECRET_PROMPT * 1000, mode=pair.mode, context=SECRET_CONTEXT)
        assert "Zorblax" not in err.value.details()
    finally:
        for config in configs:
            config.log_content = False
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "handoff" in logged and "answered" in logged  # one line per handoff on each side
    traced = "\n".join(str(dict(s.attributes)) for s in spans.get_finished_spans())
    assert "Zorblax" not in traced and "Yusra" not in traced  # spans: sizes only, always
    if log_content:
        assert repr(SECRET_PROMPT) in logged and repr(SECRET_CONTEXT) in logged
        assert repr(SECRET_RECEIVER_CONTEXT) in logged and repr(results[0].answer) in logged
    else:
        assert "Zorblax" not in logged and "Yusra" not in logged and "violet" not in logged
        assert f"prompt {len(SECRET_PROMPT)} chars" in logged


def test_a_span_packet_may_carry_fewer_rows_than_slots(pair):
    """LCF-X span packets (one row per selected sharer position, at most m) pass the shape check
    with fewer rows; more than m are refused. Marked on the adapter config as the format does."""
    if pair.mode != "lcfx":
        pytest.skip("LCF-X only")
    config = pair.receiver_service.engine.adapter.config
    config.packet = "spans"
    try:
        for rows, expected in ((3, grpc.StatusCode.DATA_LOSS), (5, grpc.StatusCode.INVALID_ARGUMENT)):
            messages = latent_messages(pair)
            header = header_of(messages)
            for i, segment in enumerate(header.segments):
                set_shape(header, i, (1, rows, segment.tensors[0].shape[2]))
            # header only: accepted means the stream then ends without its chunks (DATA_LOSS)
            events, code, details = receive_events(pair, messages[:2])
            assert code == expected, details
    finally:
        del config.packet
    still_serves(pair)


def test_a_client_that_cancels_while_queued_gives_up_its_place(queued):
    limit = queued.sharer_service.limit
    holder = hold_slot(limit, 1.5)
    call = queued.sharer_stub.Handoff(
        queued.client.request(PROMPT, context=CONTEXT, max_new_tokens=2), timeout=30
    )
    assert wait_until(lambda: limit.queued == 1, 10)
    call.cancel()
    assert wait_until(lambda: limit.queued == 0, 5)  # left the queue without waiting for the slot
    assert limit.in_flight == 1  # only the holder
    holder.join()
    assert queued.client.handoff(PROMPT, context=CONTEXT, max_new_tokens=2).summary.timings.total > 0
