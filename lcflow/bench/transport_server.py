"""The receiving end of `lcflow bench transport`: random payloads of the paper pair's shapes, and
a loopback Receiver.Receive server (in its own process, as the receiver would be) with a raw
byte sink to compare against.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import TYPE_CHECKING

import grpc

from lcflow.bench.netns import enter_namespace
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc

# torch and lcflow.transport (which imports torch) are imported in the functions that use them:
# `lcflow --help` builds this parser and must not import torch.
if TYPE_CHECKING:
    import torch

    from lcflow.transport import LatentPacket


RAW_METHOD = "/lcflow.bench.RawLoopback/Sink"  # stream of raw bytes in, total byte count out
COUNT_ONLY = "bench-count-only"  # request_id telling the bench receiver to count chunks, not decode
# ---------------------------------------------------------------------------------------------- payloads


def make_payload(
    mode: str, tokens: int, dtype: str, layers: int, width: int, device: str = "cpu"
) -> LatentPacket:
    """Random latents of the given shape on `device` (as a sharer's encoder leaves them); `tokens`
    is T for LCF and the slot count for LCF-X."""
    import torch

    from lcflow.transport import LatentPacket  # keeps --help fast
    from lcflow.transport.segments import DTYPES  # keeps --help fast

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
        from lcflow.transport import LatentReceiver, PacketAssembler, WireError  # keeps --help fast

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
        enter_namespace(namespace)
    import torch

    from lcflow.transport.memory import keep_freed_memory  # keeps --help fast

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
