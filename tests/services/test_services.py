"""End to end: both services on loopback with tiny models and tiny adapters, every mode, one
trace across both, the text channels and readers, sessions, reflection, logs that keep content out."""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers import (
    CONTEXT,
    PROMPT,
    RECEIVER_CONTEXT,
    free_port,
    in_process_answer,
    make_adapter_dir,
    set_shape,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import Pair, header_of, latent_messages, receive_events, still_serves, trace_spans

from lcflow.adapter import LatentAdapter
from lcflow.client import HandoffClient
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver, Sharer
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.config import ServiceConfig
from lcflow.serving.loading import ReceiverEngine, SharerEngine
from lcflow.serving.receiver import serve as serve_receiver
from lcflow.serving.sharer import serve as serve_sharer
from lcflow.serving.telemetry import make_tracer_provider


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
    from lcflow.handoff.pair import reader_contexts

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
    from lcflow.handoff.pair import reader_contexts

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
