"""`lcflow bench transport`: MB/s of each stage of the latent transport, against raw gRPC loopback.

Payloads have the paper pair's shapes (random values): LCF sends 28 receiver layers of
[1, T, b=128] latents plus the sharer token spans (int32 [T, 2]); LCF-X sends 28 x [1, 32, 128].
Stages, each timed on its own (best and median of --repeats; MB/s from the best):

    serialise      (quantize +) safetensors layout + byte-shuffle of each layer  (sender)
    compress       zstd                                                 (sender)
    grpc_loopback  the prepared chunk messages through Receiver.Receive  (network)
    decompress     zstd                                                 (receiver)
    deserialise    safetensors header checks + unshuffle (+ dequantize)  (receiver)
    raw_grpc       the same number of raw bytes as 1 MiB messages       (baseline)
    end_to_end     PacketWriter -> coalesce_chunks -> gRPC -> PacketAssembler, each segment
                   packed as gRPC asks for the next message, decoded as it arrives
    end_to_end_per_layer   the same, each layer's chunks sent at once (no batching)
    end_to_end_threaded    end_to_end with the packing in a worker thread, overlapping gRPC

Each case runs once per --quantize scheme (none, int8, int4, int4-hadamard:
lcflow/transport/quantize.py).
Both sides use grpc.aio.

Links (`--link loopback,1gbit,100mbit`): besides loopback, the receiver end runs in a network
namespace behind a veth pair shaped to each rate by tc's token bucket (lcflow.bench.netns; needs
root, iproute2 and tbf: skipped with the reason otherwise). Over each link, every case is sent
as the sharer sends it (as end_to_end_per_layer: a message per segment chunk, no batching) and
compared with the link's limit for the bytes actually sent, measured in the same
run: wire bytes / rate + one round trip (a 1-byte call over the same link). `--delay` would add
latency with netem, where the kernel has it (skipped with the reason where not). Each case is
sent with each fixed codec of `--link-codecs` (zstd, none); with auto, each payload once more as
a sharer's `--codec auto` sends it on a link it has not measured (lcflow.transport.link: offered
the quantizations the shipped cards allow, CARD_CODECS, that --quantize includes, it measures
each with zstd and with none, then sends the cheapest), and its record says which quantization
it chose and how it compares with the best fixed codec among those offered. The auto records
offered all of CARD_CODECS are the services' default path ("default": true). With
`--steady N`, auto then sends N more handoffs as a sharer would (re-measuring the other codecs
every so often), each followed by one with the best fixed codec, and the record compares their
mean times ("steady"): what auto costs over many handoffs, not only its pick. `--json PATH`
writes one record per payload, codec and link (see `_record`).
MB/s are always raw tensor megabytes (1e6 bytes) per second, so stages compare directly.
The server runs in its own process (spawned), as the receiver would, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import zstandard

from lcflow.core.names import CODEC_SETTINGS, QUANTIZATIONS
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.config import ServiceConfig

# torch and lcflow.transport (which imports torch) are imported in the functions that use them:
# `lcflow --help` builds this parser and must not import torch.
if TYPE_CHECKING:
    import torch

    from lcflow.transport import CodecConfig, LatentPacket, LatentSender
    from lcflow.transport.link import CodecChoice, LinkMeter
    from lcflow.transport.wire import WireStats

log = logging.getLogger(__name__)

RAW_METHOD = "/lcflow.bench.RawLoopback/Sink"  # stream of raw bytes in, total byte count out
COUNT_ONLY = "bench-count-only"  # request_id telling the bench receiver to count chunks, not decode
STAGES = (
    "serialise",
    "compress",
    "grpc_loopback",
    "decompress",
    "deserialise",
    "raw_grpc",
    "end_to_end",
    "end_to_end_per_layer",
    "end_to_end_threaded",
)


@dataclass
class TransportBenchConfig:
    tokens: list[int] = field(default_factory=lambda: [128, 512, 2048])
    dtypes: list[str] = field(default_factory=lambda: ["float16", "bfloat16"])
    codec: str = "zstd"  # or "none"
    quantize: list[str] = field(default_factory=lambda: ["none"])  # schemes to run, each on every case
    level: int = 1
    byte_shuffle: bool = True
    repeats: int = 3
    layers: int = 28
    width: int = 128  # the adapter bottleneck b
    lcfx_slots: int = 32  # LCF-X's fixed number of latent slots (0: skip LCF-X)
    keep_freed_memory: bool = True  # as the services do (lcflow/transport/memory.py), in both processes
    links: list[str] = field(default_factory=lambda: ["loopback"])  # "loopback" or tc rates ("1gbit")
    delay: str = ""  # added one-way delay (netem), e.g. "1ms"; "" for none
    # segment codecs each link record is sent with: zstd, none, and auto as the sharer runs it
    link_codecs: list[str] = field(default_factory=lambda: ["zstd", "none", "auto"])
    # handoffs auto sends after its probes, each followed by one with the best fixed codec (on a
    # connection of its own), whose mean times are compared: auto's steady state, exploring included
    steady: int = 0
    # where the latents are on both ends: the sharer quantizes there, the receiver dequantizes there
    # and gets every tensor there (as its decoder reads them); "auto": CUDA when present
    device: str = "auto"


# ---------------------------------------------------------------------------------------------- payloads


def make_payload(
    mode: str, tokens: int, dtype: str, layers: int, width: int, device: str = "cpu"
) -> LatentPacket:
    """Random latents of the given shape on `device` (as a sharer's encoder leaves them); `tokens`
    is T for LCF and the slot count for LCF-X."""
    import torch

    from lcflow.transport import LatentPacket
    from lcflow.transport.segments import DTYPES

    generator = torch.Generator().manual_seed(tokens)
    torch_dtype = DTYPES[dtype][0]
    per_layer = {
        layer: {"latent": torch.randn(1, tokens, width, generator=generator).to(device, torch_dtype)}
        for layer in range(layers)
    }
    shared = {}
    if mode == "lcf":  # character spans of each sharer token, ~4 characters a token
        starts = torch.arange(tokens, dtype=torch.int32) * 4
        shared = {"token_spans": torch.stack([starts, starts + 4], dim=1)}
    return LatentPacket(
        mode, "bench-adapter", "bench-sharer", "bench-receiver", list(range(layers)), per_layer, shared
    )


def _segments(packet: LatentPacket) -> list[dict[str, torch.Tensor]]:
    return [packet.tensors_per_layer[layer] for layer in packet.layers] + (
        [packet.shared_tensors] if packet.shared_tensors else []
    )


# ---------------------------------------------------------------------------------------------- server


class BenchReceiver(pb_grpc.ReceiverServicer):
    """Receiver.Receive without a model: assembles the packet (or only counts chunks) on `device`
    and reports. On a GPU every tensor is moved there and the device synchronised before the
    summary goes back, so the time counts the dequantizing and the host-to-device copies."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    async def Receive(self, request_iterator, context):
        from lcflow.transport import LatentReceiver, PacketAssembler, WireError

        first = await anext(request_iterator)
        count_only = first.request.request_id == COUNT_ONLY
        start = time.perf_counter()
        assembler: LatentReceiver = PacketAssembler(device=self.device)
        wire_bytes = chunks = 0
        try:
            async for message in request_iterator:
                if not count_only:
                    assembler.on_message(message)
                    continue
                pieces = (
                    message.chunks.chunks if message.WhichOneof("message") == "chunks" else [message.chunk]
                )
                wire_bytes += sum(len(piece.payload) for piece in pieces)
                chunks += sum(1 for piece in pieces if piece.payload)
            if not count_only:
                _on_device(assembler.on_stream_end(), self.device)
                wire_bytes, chunks = assembler.stats.bytes_wire, assembler.stats.chunks
        except WireError as err:
            await context.abort(err.code, err.details)
        timings = pb.StageTimings(
            transfer=(time.perf_counter() - start) * 1000,
            unpack=assembler.stats.codec_ms + assembler.stats.serialise_ms,
        )
        summary = pb.HandoffSummary(
            timings=timings, bytes_raw=assembler.stats.bytes_raw, bytes_wire=wire_bytes, chunks=chunks
        )
        yield pb.HandoffEvent(summary=summary)


def _on_device(packet: LatentPacket, device: str) -> None:
    """Every tensor of `packet` on `device`, waited for (a no-op on the CPU)."""
    if device == "cpu":
        return
    import torch

    for tensors in _segments(packet):
        for tensor in tensors.values():
            tensor.to(device, non_blocking=True)
    torch.cuda.synchronize(device)


async def _raw_sink(request_iterator, context) -> bytes:
    total = 0
    async for message in request_iterator:
        total += len(message)
    return total.to_bytes(8, "little")


async def _serve(connection, host: str, device: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ReceiverServicer_to_server(BenchReceiver(device), server)
    raw = grpc.method_handlers_generic_handler(
        "lcflow.bench.RawLoopback", {"Sink": grpc.stream_unary_rpc_method_handler(_raw_sink)}
    )
    server.add_generic_rpc_handlers([raw])
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    connection.send(port)
    await asyncio.get_running_loop().run_in_executor(None, connection.recv)  # any message means stop
    await server.stop(grace=None)


def serve(
    connection, tune_malloc: bool = True, host: str = "127.0.0.1", namespace: str = "", device: str = "cpu"
) -> None:
    """Child process: serve the bench receiver and the raw sink (grpc.aio) until told to stop, in
    network namespace `namespace` when given (entered before any thread starts)."""
    if namespace:
        from lcflow.bench.netns import enter_namespace

        enter_namespace(namespace)
    import torch

    from lcflow.transport.memory import keep_freed_memory

    torch.set_num_threads(1)
    if tune_malloc:
        keep_freed_memory()
    asyncio.run(_serve(connection, host, device))


class LoopbackServer:
    """Starts `serve` in a spawned process, as a separate receiver would be; gives the target address
    (on loopback, or at `host` inside network namespace `namespace`: the far end of an emulated link)."""

    def __init__(
        self, tune_malloc: bool = True, host: str = "127.0.0.1", namespace: str = "", device: str = "cpu"
    ):
        self.tune_malloc, self.host, self.namespace, self.device = tune_malloc, host, namespace, device

    def __enter__(self) -> str:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        args = (child, self.tune_malloc, self.host, self.namespace, self.device)
        self.process = context.Process(target=serve, args=args, daemon=True)
        self.process.start()
        if not self.connection.poll(120):
            raise RuntimeError("the bench receiver did not start within 120 s")
        return f"{self.host}:{self.connection.recv()}"

    def __exit__(self, *exc) -> None:
        self.connection.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()


# ---------------------------------------------------------------------------------------------- stages


def _times_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: first calls pay for allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _stage(times_ms: list[float], raw_bytes: int, wire_bytes: int | None = None) -> dict:
    """Best (least disturbed) and median time; MB/s from the best, since other work on a
    small shared machine only ever adds time."""
    best = min(times_ms)
    result = {
        "ms": round(best, 3),
        "median_ms": round(statistics.median(times_ms), 3),
        "mb_s": round(raw_bytes / 1e6 / (best / 1000), 3),
    }
    if wire_bytes is not None:
        result["wire_mb_s"] = round(wire_bytes / 1e6 / (best / 1000), 3)
    return result


def _codec_stages(
    packet: LatentPacket, codec: CodecConfig, repeats: int, device: str = "cpu"
) -> tuple[dict, list[list[bytes]]]:
    """serialise / compress / decompress / deserialise (onto `device`) timed on their own; returns
    each segment's chunks."""
    import torch

    from lcflow.transport.codec import SegmentDecoder
    from lcflow.transport.segments import (
        TensorSpec,
        check_segment,
        load_segment,
        max_blob_bytes,
        serialise_segment,
    )

    segments = _segments(packet)
    shuffle, quantizer = codec.shuffles, codec.quantizer()  # as PacketWriter does

    def serialise_all() -> list[bytes | bytearray]:
        return [serialise_segment(quantizer.encode(tensors), shuffle) for tensors in segments]

    blobs = serialise_all()
    serialise_ms = _times_ms(serialise_all, repeats)

    compressor = codec.compressor()
    decompressor = zstandard.ZstdDecompressor()
    compressed = [compressor.compress(blob) for blob in blobs]
    compress_ms = _times_ms(lambda: [compressor.compress(blob) for blob in blobs], repeats)
    chunked = [[c[i : i + codec.chunk_size] for i in range(0, len(c), codec.chunk_size)] for c in compressed]
    specs = [{name: TensorSpec.of(t) for name, t in tensors.items()} for tensors in segments]
    wire_specs = [quantizer.wire_specs(spec) for spec in specs]

    def decompress_all() -> list[bytearray]:
        out = []
        for chunks, spec in zip(chunked, wire_specs, strict=True):
            decoder = SegmentDecoder(codec.name, max_blob_bytes(spec), "bench segment", decompressor)
            for chunk in chunks:
                decoder.feed(chunk)
            out.append(decoder.finish())
        return out

    decoded = decompress_all()
    decompress_ms = _times_ms(decompress_all, repeats)

    def deserialise_all() -> list[dict[str, torch.Tensor]]:
        out = []
        for blob, spec, wire_spec in zip(decoded, specs, wire_specs, strict=True):
            header = check_segment(blob, wire_spec, "bench segment")
            out.append(quantizer.decode(load_segment(blob, header, wire_spec, shuffle), spec, device))
        if device != "cpu":
            torch.cuda.synchronize(device)  # the dequantizing is queued, not done
        return out

    deserialise_ms = _times_ms(deserialise_all, repeats)
    raw = packet.raw_bytes()
    stages = {
        "serialise": _stage(serialise_ms, raw),
        "compress": _stage(compress_ms, raw),
        "decompress": _stage(decompress_ms, raw),
        "deserialise": _stage(deserialise_ms, raw),
    }
    return stages, chunked


def _writer_messages(
    packet: LatentPacket, codec: CodecConfig, writer: LatentSender | None = None
) -> Iterator[pb.LatentMessage]:
    """What a sharer streams: request, header, then each segment packed as it is reached."""
    from lcflow.transport import packet_messages

    yield pb.LatentMessage(request=pb.ReceiverRequest(prompt_text="bench", mode=pb.LCF))
    yield from packet_messages(packet, codec, writer)


async def _packed_in_thread(messages: Iterator[pb.LatentMessage]) -> AsyncIterator[pb.LatentMessage]:
    """Run the packing generator in a worker thread so it overlaps with gRPC sending on the event loop.

    zstd and numpy release the GIL, so with a core to spare the next layer is compressed while
    the previous one is on the wire. On the 2-core development machine, shared with a training
    job, this is slower than packing inline: the two threads mostly wait for each other's GIL.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=8)
    done = object()

    def produce() -> None:
        try:
            for message in messages:
                asyncio.run_coroutine_threadsafe(queue.put(message), loop).result()
        finally:
            asyncio.run_coroutine_threadsafe(queue.put(done), loop).result()

    producer = loop.run_in_executor(None, produce)
    while (message := await queue.get()) is not done:
        yield message
    await producer  # re-raises anything the packing thread raised


async def _times_ms_async(fn: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    await fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


async def _grpc_stages(target: str, packet: LatentPacket, codec: CodecConfig, repeats: int) -> dict:
    from lcflow.transport import coalesce_chunks
    from lcflow.transport.codec import MAX_CHUNK_BYTES

    raw = packet.raw_bytes()
    prepared = list(coalesce_chunks(_writer_messages(packet, codec), codec.chunk_size))
    prepared[0].request.request_id = COUNT_ONLY
    raw_messages = [bytes(MAX_CHUNK_BYTES)] * (raw // MAX_CHUNK_BYTES) + [bytes(raw % MAX_CHUNK_BYTES or 1)]

    async with grpc.aio.insecure_channel(target) as channel:
        receiver = pb_grpc.ReceiverStub(channel)
        raw_sink = channel.stream_unary(RAW_METHOD)  # bytes in, bytes out: no (de)serialiser

        async def summary_of(messages: Iterable[pb.LatentMessage] | AsyncIterator) -> pb.HandoffSummary:
            requests = messages if isinstance(messages, AsyncIterator) else iter(messages)
            events = [event async for event in receiver.Receive(requests)]
            return events[-1].summary

        async def send_prepared() -> pb.HandoffSummary:
            return await summary_of(prepared)

        async def send_raw() -> int:
            return int.from_bytes(await raw_sink(iter(raw_messages)), "little")

        summaries: list[pb.HandoffSummary] = []

        async def end_to_end() -> None:
            messages = coalesce_chunks(_writer_messages(packet, codec), codec.chunk_size)
            summaries.append(await summary_of(messages))

        async def end_to_end_per_layer() -> None:
            await summary_of(_writer_messages(packet, codec))

        async def end_to_end_threaded() -> None:
            messages = coalesce_chunks(_writer_messages(packet, codec), codec.chunk_size)
            await summary_of(_packed_in_thread(messages))

        wire = (await send_prepared()).bytes_wire
        assert await send_raw() == sum(len(m) for m in raw_messages), "the raw loopback lost bytes"
        loopback_ms = await _times_ms_async(send_prepared, repeats)
        raw_ms = await _times_ms_async(send_raw, repeats)
        per_layer_ms = await _times_ms_async(end_to_end_per_layer, repeats)
        threaded_ms = await _times_ms_async(end_to_end_threaded, repeats)
        summaries.clear()
        e2e_ms = await _times_ms_async(end_to_end, repeats)
    assert all(s.bytes_raw == raw for s in summaries), "the receiver did not assemble the whole packet"
    stages = {
        "grpc_loopback": _stage(loopback_ms, raw, wire),
        "raw_grpc": _stage(raw_ms, raw, raw),
        "end_to_end": _stage(e2e_ms, raw, wire),
        "end_to_end_per_layer": _stage(per_layer_ms, raw, wire),
        "end_to_end_threaded": _stage(threaded_ms, raw, wire),
    }
    stages["end_to_end"]["receiver_unpack_ms"] = round(min(s.timings.unpack for s in summaries), 3)
    return stages


def _connection(target: str) -> grpc.aio.Channel:
    """A channel with a connection of its own: gRPC shares one connection among channels with the
    same arguments, and a local subchannel pool each keeps them apart."""
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


async def _send(
    channel: grpc.aio.Channel, packet: LatentPacket, codec: CodecConfig
) -> tuple[float, WireStats]:
    """One handoff's latents over `channel` as the sharer sends them (a message per chunk of each
    segment, each layer leaving as soon as it is packed: `end_to_end_per_layer`; batching small
    segments as `end_to_end` does holds them back, and over a 1 Gbit/s link that cost a 2048-token
    int4 packet 1.33x the link's limit against 1.03x): ms end to end, and the sender's WireStats
    (what the services' link meter reads: bytes raw, serialised and on the wire; zstd's time)."""
    from lcflow.transport import PacketWriter

    writer = PacketWriter.for_packet(packet, codec)
    start = time.perf_counter()
    events = [e async for e in pb_grpc.ReceiverStub(channel).Receive(_writer_messages(packet, codec, writer))]
    ms, summary = (time.perf_counter() - start) * 1000, events[-1].summary
    assert summary.bytes_raw == packet.raw_bytes(), "the receiver lost part of the packet"
    assert summary.bytes_wire == writer.stats.bytes_wire, "the receiver got other bytes than were sent"
    return ms, writer.stats


async def _link_runs(
    channels: list[grpc.aio.Channel], packet: LatentPacket, codecs: list[CodecConfig], repeats: int
) -> list[dict]:
    """Over one (emulated) link: the packet end to end with each of `codecs`, each over its own
    connection of `channels` (a codec sent after a larger one on a shared connection is slowed
    for several handoffs: see the README), and one round trip (a 1-byte call to the raw sink).
    After a warm-up each, the codecs are sent in `repeats` rounds, one of each per round, so that
    whatever slows this small machine for a while slows them all alike; best of the rounds each."""
    raw_sink = channels[0].stream_unary(RAW_METHOD)

    async def round_trip() -> None:
        await raw_sink(iter([b"\0"]))

    rtt_ms = min(await _times_ms_async(round_trip, max(5, repeats)))
    for channel, codec in zip(channels, codecs, strict=True):  # warm-up
        await _send(channel, packet, codec)
    runs: list[list[tuple[float, WireStats]]] = [[] for _ in codecs]
    for _ in range(repeats):
        for i, (channel, codec) in enumerate(zip(channels, codecs, strict=True)):
            runs[i].append(await _send(channel, packet, codec))
    return [
        {
            "end_to_end_ms": min(ms for ms, _ in series),
            "rtt_ms": rtt_ms,
            "wire_bytes": series[-1][1].bytes_wire,
        }
        for series in runs
    ]


async def _auto_choice(
    channel: grpc.aio.Channel, packet: LatentPacket, schemes: tuple[str, ...], config
) -> tuple[CodecChoice, LinkMeter]:
    """What `--codec auto` sends once a sharer has measured a link it did not know
    (lcflow.transport.link), offered the quantizations `schemes`: handoffs over `channel` (as a
    sharer has one connection to its receiver) with what a fresh LinkMeter picks, each one's time
    fed back, until it has measured every arm; then its pick, and the meter."""
    from lcflow.transport.link import PROBES, LinkMeter

    meter = LinkMeter()
    await _send(channel, packet, _codec_of(config, schemes[-1], "none"))  # connect: not a handoff's cost
    for _ in range(2 * PROBES * len(schemes)):  # each scheme with zstd and with none, PROBES times
        await _auto_handoff(channel, packet, meter, schemes, config)
    return meter.choose(schemes), meter


async def _auto_handoff(
    channel: grpc.aio.Channel, packet: LatentPacket, meter: LinkMeter, schemes: tuple[str, ...], config
) -> tuple[float, str]:
    """One handoff as a sharer with `--codec auto` sends it: what the meter picks, its time fed
    back (as SharerService._measure_link does); returns the time and the arm sent."""
    choice = meter.choose(schemes)
    ms, stats = await _send(channel, packet, _codec_of(config, choice.quantization, choice.name))
    meter.record_handoff(choice.quantization, choice.name, stats, ms)
    return ms, f"{choice.quantization}/{choice.name}"


async def _steady(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
    packet: LatentPacket,
    meter: LinkMeter,
    schemes: tuple[str, ...],
    best: CodecConfig,
    handoffs: int,
    config,
) -> dict:
    """Auto's steady state: `handoffs` more of its handoffs (re-measuring included) over the first
    channel, each followed by one with the `best` fixed codec over the second; their mean times."""
    auto_ms, best_ms, sent = [], [], []
    for _ in range(handoffs):
        ms, arm = await _auto_handoff(channels[0], packet, meter, schemes, config)
        auto_ms.append(ms)
        sent.append(arm)
        best_ms.append((await _send(channels[1], packet, best))[0])
    auto_mean, best_mean = statistics.mean(auto_ms), statistics.mean(best_ms)
    return {
        "handoffs": handoffs,
        "auto_mean_ms": round(auto_mean, 3),
        "best_fixed": f"{best.quantization}/{best.name}",
        "best_fixed_mean_ms": round(best_mean, 3),
        "auto_vs_best_fixed": round(auto_mean / best_mean, 3),
        "sent": dict(sorted(collections.Counter(sent).items())),
    }


async def _payload_runs(
    target: str, packet: LatentPacket, runs: list[tuple], auto_schemes: tuple[str, ...], config
) -> tuple[list[tuple], list[dict]]:
    """`runs` ((quantization, setting, segment codec, why) each) and, with `auto_schemes`, auto's
    choice after it measured the link, all timed by _link_runs; returns the runs with auto's
    appended, and their measurements (auto's with its time over the best fixed codec's among
    those it was offered, and with --steady its steady state against that codec)."""
    channels = [_connection(target) for _ in runs]
    try:
        if auto_schemes:
            channels.append(_connection(target))  # auto's choice is timed on the connection it probed
            choice, meter = await _auto_choice(channels[-1], packet, auto_schemes, config)
            runs = [*runs, (choice.quantization, "auto", choice.name, choice.reason)]
        codecs = [_codec_of(config, q, name) for q, _, name, _ in runs]
        measured = await _link_runs(channels, packet, codecs, config.repeats)
        # the best fixed codec among the quantizations auto was offered, which auto is compared with
        fixed = [i for i, run in enumerate(runs) if run[1] != "auto" and run[0] in auto_schemes]
        if auto_schemes and fixed:
            auto, best = measured[-1], min(fixed, key=lambda i: measured[i]["end_to_end_ms"])
            auto["auto_vs_best_fixed"] = round(auto["end_to_end_ms"] / measured[best]["end_to_end_ms"], 3)
            if config.steady:
                pair = (channels[-1], channels[best])
                auto["steady"] = await _steady(
                    pair, packet, meter, auto_schemes, codecs[best], config.steady, config
                )
        return runs, measured
    finally:
        for channel in channels:
            await channel.close()


def _codec_of(config: TransportBenchConfig, quantize: str, name: str = "") -> CodecConfig:
    from lcflow.transport import CodecConfig

    return CodecConfig(
        name=name or config.codec, level=config.level, byte_shuffle=config.byte_shuffle, quantization=quantize
    )


def bench_case(
    target: str, mode: str, tokens: int, dtype: str, quantize: str, config: TransportBenchConfig
) -> dict:
    codec = _codec_of(config, quantize)
    packet = make_payload(mode, tokens, dtype, config.layers, config.width, config.device)
    codec_stages, chunked = _codec_stages(packet, codec, config.repeats, config.device)
    grpc_stages = asyncio.run(_grpc_stages(target, packet, codec, config.repeats))
    stages = {**codec_stages, **grpc_stages}
    raw, wire = packet.raw_bytes(), sum(len(c) for chunks in chunked for c in chunks)
    return {
        "mode": mode,
        "dtype": dtype,
        "quantize": quantize,
        "tokens": tokens,
        "layers": config.layers,
        "width": config.width,
        "raw_bytes": raw,
        "wire_bytes": wire,
        "ratio": round(raw / wire, 3),
        "chunks": sum(len(chunks) for chunks in chunked),
        "stages": {name: stages[name] for name in STAGES},
        "transport_overhead_ms": stages["end_to_end"]["ms"],
        "transport_vs_raw_grpc": round(stages["end_to_end"]["mb_s"] / stages["raw_grpc"]["mb_s"], 3),
    }


def machine_info(device: str = "cpu") -> dict:
    import torch

    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else "",
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "zstandard": zstandard.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# The quantizations the shipped adapters' model cards allow a sharer's `--codec auto` to send,
# largest first, their choice last (lcflow.serving.registry.card_codecs of the LCF card
# smollm2-to-gemma3-lcf and the LCF-X card gemma3-to-gemma3-lcfx): what the services' default
# path (--quantize card, --codec auto) is offered. The bench's auto runs are offered these.
CARD_CODECS = {"lcf": ("none", "int8", "int4"), "lcfx": ("none", "int8")}
DEFAULT_CODEC_SETTING = ServiceConfig.codec  # the sharer's --codec default ("auto")


def offered_schemes(mode: str, quantize: list[str]) -> tuple[str, ...]:
    """What the bench's auto run of a `mode` payload is offered: the card's codecs that this run's
    --quantize includes (all of them: the services' default path), or else --quantize itself."""
    return tuple(q for q in CARD_CODECS[mode] if q in quantize) or tuple(quantize)


def run_transport_bench(config: TransportBenchConfig) -> dict:
    """Every (mode, T, dtype, quantization) case on loopback, then over each emulated link; returns
    the JSON-ready report (`results`: the loopback stages; `links`: one record per case and link)."""
    from lcflow.provision.loading import pick_device
    from lcflow.transport.memory import keep_freed_memory

    config = replace(config, device=str(pick_device(config.device)))  # "auto" -> cuda or cpu

    cases = [("lcf", tokens) for tokens in config.tokens]
    if config.lcfx_slots:
        cases.append(("lcfx", config.lcfx_slots))
    cases = [(m, t, d, q) for m, t in cases for d in config.dtypes for q in config.quantize]
    results = []
    if config.keep_freed_memory:
        keep_freed_memory()
    records = []
    with LoopbackServer(config.keep_freed_memory, device=config.device) as target:
        for mode, tokens, dtype, quantize in cases:
            log.info("bench transport: %s T=%d %s quantize %s", mode, tokens, dtype, quantize)
            results.append(bench_case(target, mode, tokens, dtype, quantize, config))
        if "loopback" in config.links:
            records = _link_records("loopback", target, cases, results, config)
    skipped = {}
    rates = [link for link in config.links if link != "loopback"]
    if rates:
        from lcflow.bench.netns import why_rate_limit_unavailable

        why = why_rate_limit_unavailable()
        if why is not None:
            skipped = {rate: why for rate in rates}
            print(f"skipping the emulated links {', '.join(rates)}: {why}")
            rates = []
    if config.delay:
        skipped[f"delay {config.delay}"] = delay_unavailable_reason()
        print(f"not adding a delay of {config.delay}: {skipped[f'delay {config.delay}']}")
    for rate in rates:
        records += _shaped_link_records(rate, cases, results, config)
    report = {
        "bench": "transport",
        "machine": machine_info(config.device),
        "config": asdict(config),
        "results": results,
    }
    return {**report, "links": records, "links_skipped": skipped}


def delay_unavailable_reason() -> str:
    """Why --delay is not applied: netem is what adds delay, and this bench does not yet set it up;
    on the development machine the kernel has no netem at all (`tc ... netem` is refused)."""
    return "adding delay needs tc's netem qdisc, which this bench does not set up (the development kernel lacks it)"


def _record(
    case: tuple, setting: str, measured: dict, link: str, raw: int, limit_ms: float, raw_loopback_ms: float
) -> dict:
    """One record of `--json`: the fields the issue names, plus the dtype, the codec setting and why."""
    mode, tokens, dtype, quantize = case
    record = {
        "mode": mode,
        "tokens": tokens,
        "dtype": dtype,
        "codec": measured["codec"],  # the segment codec that ran, as named in the header
        "codec_setting": setting,  # --link-codecs: zstd, none or auto
        "codec_reason": measured["codec_reason"],
        "quantization": quantize,  # auto: the one it chose
        # the services' default path: --codec auto, offered the quantizations the model cards allow
        "default": setting == DEFAULT_CODEC_SETTING and measured.get("offered") == CARD_CODECS[mode],
        "link": link,
        "raw_bf16_bytes": raw,
        "wire_bytes": measured["wire_bytes"],
        "end_to_end_ms": round(measured["end_to_end_ms"], 3),
        "link_limit_ms": round(limit_ms, 3),
        "raw_loopback_ms": round(raw_loopback_ms, 3),
        "vs_limit": round(measured["end_to_end_ms"] / limit_ms, 3),
    }
    if "offered" in measured:
        record["offered"] = list(measured["offered"])
    for key in ("auto_vs_best_fixed", "steady"):  # auto's, from _payload_runs
        if key in measured:
            record[key] = measured[key]
    return record


def _link_records(
    link: str, target: str, cases: list, results: list[dict], config: TransportBenchConfig, bits_per_s=None
) -> list[dict]:
    """Each payload sent to `target` with every quantization and fixed codec setting and, with
    auto, with what auto chose once it had measured the link (offered offered_schemes); all of
    these timed in the same rounds, and auto compared with the best fixed codec (_payload_runs). The link's limit: on loopback (no `bits_per_s`)
    the raw gRPC baseline for the same bf16 bytes; on a shaped link, the bytes actually sent at
    its rate plus one round trip, measured in the same run."""
    records = []
    raw_ms = {
        case[:3]: result["stages"]["raw_grpc"]["ms"] for case, result in zip(cases, results, strict=True)
    }
    fixed = [setting for setting in config.link_codecs if setting != "auto"]
    for payload in dict.fromkeys(case[:3] for case in cases):
        mode, tokens, dtype = payload
        log.info("bench transport over %s: %s T=%d %s", link, mode, tokens, dtype)
        packet = make_payload(mode, tokens, dtype, config.layers, config.width, config.device)
        # (quantization, --link-codecs setting, segment codec, why)
        runs = [(q, setting, setting, f"--codec {setting}") for q in config.quantize for setting in fixed]
        schemes = offered_schemes(mode, config.quantize) if "auto" in config.link_codecs else ()
        runs, measured = asyncio.run(_payload_runs(target, packet, runs, schemes, config))
        for (quantize, setting, name, reason), m in zip(runs, measured, strict=True):
            limit_ms = (
                raw_ms[payload]
                if bits_per_s is None
                else m["wire_bytes"] * 8 / bits_per_s * 1000 + m["rtt_ms"]
            )
            m = {**m, "codec": name, "codec_reason": reason}
            if setting == "auto":
                m["offered"] = schemes
            case = (*payload, quantize)
            records.append(_record(case, setting, m, link, packet.raw_bytes(), limit_ms, raw_ms[payload]))
    return records


def _shaped_link_records(
    rate: str, cases: list, results: list[dict], config: TransportBenchConfig
) -> list[dict]:
    """Every case over a veth link shaped to `rate`, the receiver end in its own namespace."""
    from lcflow.bench.netns import rate_limited_link

    with rate_limited_link("lcfb", rate) as link:
        server = LoopbackServer(config.keep_freed_memory, link.remote, link.namespace, config.device)
        with server as target:
            return _link_records(rate, target, cases, results, config, link.bits_per_s)


# ---------------------------------------------------------------------------------------------- CLI


def format_table(report: dict) -> str:
    header = f"{'mode':5} {'T':>5} {'dtype':9} {'quant':5} {'MB':>7} {'ratio':>5} " + " ".join(
        f"{s:>13}" for s in STAGES
    )
    lines = [header, f"{'':42}" + " ".join(f"{'MB/s':>13}" for _ in STAGES)]
    for r in report["results"]:
        cells = " ".join(f"{r['stages'][s]['mb_s']:>13.0f}" for s in STAGES)
        lines.append(
            f"{r['mode']:5} {r['tokens']:>5} {r['dtype']:9} {r['quantize']:5} {r['raw_bytes'] / 1e6:>7.2f} "
            f"{r['ratio']:>5.2f} {cells}"
        )
    lines.append("")
    for r in report["results"]:
        lines.append(
            f"{r['mode']:5} T={r['tokens']:<5} {r['dtype']:9} {r['quantize']:5} end-to-end "
            f"{r['transport_overhead_ms']:8.1f} ms, "
            f"{100 * r['transport_vs_raw_grpc']:5.1f}% of raw gRPC loopback throughput"
        )
    machine = report["machine"]
    lines.append(f"machine: {machine['cpu_count']} CPUs, {machine['platform']}")
    return "\n".join(lines)


def format_links(records: list[dict]) -> str:
    """One line per link record: end-to-end time against the link's limit for the bytes sent."""
    lines = [
        f"{'link':>9} {'mode':5} {'T':>5} {'quant':5} {'codec':11} {'wire MB':>8} {'e2e ms':>9} "
        f"{'limit ms':>9} {'x limit':>7}"
    ]
    for r in records:
        codec = r["codec"] if r["codec_setting"] != "auto" else f"auto:{r['codec']}"
        lines.append(
            f"{r['link']:>9} {r['mode']:5} {r['tokens']:>5} {r['quantization']:5} {codec:11} "
            f"{r['wire_bytes'] / 1e6:>8.2f} {r['end_to_end_ms']:>9.1f} {r['link_limit_ms']:>9.1f} {r['vs_limit']:>7.2f}"
            + (f"  {r['auto_vs_best_fixed']:.2f}x best fixed" if "auto_vs_best_fixed" in r else "")
            + (
                f", steady {r['steady']['auto_vs_best_fixed']:.2f}x (mean of {r['steady']['handoffs']})"
                if "steady" in r
                else ""
            )
            + ("  (default)" if r["default"] else "")
        )
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "transport",
        help="MB/s of each latent transport stage vs raw gRPC loopback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TransportBenchConfig()
    p.add_argument("--tokens", type=int, nargs="+", default=defaults.tokens, help="LCF sharer token counts T")
    p.add_argument(
        "--dtype",
        nargs="+",
        default=defaults.dtypes,
        choices=["float16", "bfloat16", "float32"],
        help="latent dtypes",
    )
    p.add_argument("--codec", default=defaults.codec, choices=["zstd", "none"], help="segment codec")
    p.add_argument("--level", type=int, default=defaults.level, help="zstd level")
    p.add_argument(
        "--quantize",
        nargs="+",
        default=defaults.quantize,
        choices=QUANTIZATIONS,
        help="latent quantizations to run, each on every case (int8, int4: wire format version 2)",
    )
    p.add_argument("--no-shuffle", action="store_true", help="send without byte-shuffle")
    p.add_argument(
        "--repeats",
        type=int,
        default=defaults.repeats,
        help="timed runs per stage (best and median reported)",
    )
    p.add_argument("--layers", type=int, default=defaults.layers, help="receiver layers carrying latents")
    p.add_argument("--width", type=int, default=defaults.width, help="latent width b")
    p.add_argument(
        "--lcfx-slots", type=int, default=defaults.lcfx_slots, help="LCF-X latent slots (0 skips LCF-X)"
    )
    p.add_argument(
        "--no-keep-freed-memory",
        action="store_true",
        help="leave glibc's malloc thresholds as they are (see lcflow/transport/memory.py)",
    )
    p.add_argument(
        "--link",
        default=",".join(defaults.links),
        help="links to send over, comma-separated: loopback and/or tc rates (10gbit, 1gbit, 100mbit); a "
        "rate runs the receiver end in a network namespace behind a veth pair shaped to it (root, "
        "iproute2 and tbf needed; skipped with the reason otherwise)",
    )
    p.add_argument(
        "--link-codecs",
        default=",".join(defaults.link_codecs),
        help="segment codecs each case is sent with, comma-separated: zstd, none, auto (once per payload, "
        "as a sharer with --codec auto runs it on an unmeasured link: offered the quantizations the shipped "
        "cards allow that --quantize includes, each measured with zstd and none, then the cheapest); auto "
        "records also say how they compare with the best fixed codec",
    )
    p.add_argument(
        "--steady",
        type=int,
        default=defaults.steady,
        help="after auto's probes, this many more of its handoffs (re-measuring other codecs included), "
        "each followed by one with the best fixed codec on a connection of its own; their mean times are "
        "compared (auto's steady state). 0: skip",
    )
    p.add_argument(
        "--device",
        default=defaults.device,
        help="where the latents are on both ends: cpu, cuda, cuda:N or auto (CUDA when present). The "
        "sharer quantizes there; the receiver dequantizes there and gets every tensor there, synchronised "
        "before it answers",
    )
    p.add_argument("--delay", default="", help="one-way delay to add on the emulated links (needs netem)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--json", help="write one record per payload, codec and link here (a JSON list)")
    p.set_defaults(func=run)


def _check_device(device: str) -> None:
    """--device names one this machine has (UsageError, one line, otherwise)."""
    import torch

    from lcflow.core.errors import UsageError

    try:
        resolved = torch.device("cpu" if device == "auto" else device)
    except RuntimeError:
        raise UsageError(f"--device: {device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and (
        not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()
    ):
        raise UsageError(f"--device {device}: this machine has no such CUDA device; use cpu or auto")
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: the bench runs on cpu or cuda")


def run(args) -> int:
    config = TransportBenchConfig(
        tokens=args.tokens,
        dtypes=args.dtype,
        codec=args.codec,
        quantize=args.quantize,
        level=args.level,
        byte_shuffle=not args.no_shuffle,
        repeats=args.repeats,
        layers=args.layers,
        width=args.width,
        lcfx_slots=args.lcfx_slots,
        keep_freed_memory=not args.no_keep_freed_memory,
        links=[link.strip() for link in args.link.split(",") if link.strip()],
        delay=args.delay,
        link_codecs=[codec.strip() for codec in args.link_codecs.split(",") if codec.strip()],
        steady=args.steady,
        device=args.device,
    )
    from lcflow.core.errors import UsageError

    unknown = sorted(set(config.link_codecs) - set(CODEC_SETTINGS))
    if unknown or not config.link_codecs:
        raise UsageError(f"--link-codecs: use some of {', '.join(CODEC_SETTINGS)}, not {args.link_codecs!r}")
    for link in config.links:
        if link != "loopback":
            from lcflow.bench.netns import rate_bits_per_s

            try:
                rate_bits_per_s(link)  # before anything runs
            except ValueError as err:
                raise UsageError(f"--link: {err}") from None
    _check_device(config.device)
    report = run_transport_bench(config)
    print(format_table(report))
    if report["links"]:
        print(format_links(report["links"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report["links"], indent=2))
        print(f"link records written to {args.json}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"written to {args.out}")
    return 0
