"""The stages `lcflow bench transport` times: each codec step on its own, the whole path over
gRPC, and the links (sends as the sharer sends them, auto codec choice, steady handoffs).
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import zstandard

from lcflow.bench.transport_server import COUNT_ONLY, RAW_METHOD, _segments
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc

# torch and lcflow.transport (which imports torch) are imported in the functions that use them:
# `lcflow --help` builds this parser and must not import torch.
if TYPE_CHECKING:
    import torch

    from lcflow.transport import CodecConfig, LatentPacket, LatentSender
    from lcflow.transport.link import CodecChoice, LinkMeter
    from lcflow.transport.wire import WireStats


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


def codec_of(config: TransportBenchConfig, quantize: str, name: str = "") -> CodecConfig:
    """The segment codec of one case: the bench's settings with this quantization (and codec name)."""
    from lcflow.transport import CodecConfig  # keeps --help fast

    return CodecConfig(
        name=name or config.codec, level=config.level, byte_shuffle=config.byte_shuffle, quantization=quantize
    )


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

    from lcflow.transport.codec import SegmentDecoder  # keeps --help fast
    from lcflow.transport.segments import (  # keeps --help fast
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
    from lcflow.transport import packet_messages  # keeps --help fast

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
    from lcflow.transport import coalesce_chunks  # keeps --help fast
    from lcflow.transport.codec import MAX_CHUNK_BYTES  # keeps --help fast

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
    from lcflow.transport import PacketWriter  # keeps --help fast

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
    from lcflow.transport.link import PROBES, LinkMeter  # keeps --help fast

    meter = LinkMeter()
    await _send(channel, packet, codec_of(config, schemes[-1], "none"))  # connect: not a handoff's cost
    for _ in range(2 * PROBES * len(schemes)):  # each scheme with zstd and with none, PROBES times
        await _auto_handoff(channel, packet, meter, schemes, config)
    return meter.choose(schemes), meter


async def _auto_handoff(
    channel: grpc.aio.Channel, packet: LatentPacket, meter: LinkMeter, schemes: tuple[str, ...], config
) -> tuple[float, str]:
    """One handoff as a sharer with `--codec auto` sends it: what the meter picks, its time fed
    back (as SharerService._measure_link does); returns the time and the arm sent."""
    choice = meter.choose(schemes)
    ms, stats = await _send(channel, packet, codec_of(config, choice.quantization, choice.name))
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
        codecs = [codec_of(config, q, name) for q, _, name, _ in runs]
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
