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
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import zstandard

from lcflow.bench.netns import rate_bits_per_s, rate_limited_link, why_rate_limit_unavailable
from lcflow.bench.transport_server import LoopbackServer, make_payload
from lcflow.bench.transport_stages import (
    TransportBenchConfig,
    _codec_stages,
    _grpc_stages,
    _payload_runs,
    codec_of,
)
from lcflow.core.errors import UsageError
from lcflow.core.names import CODEC_SETTINGS, QUANTIZATIONS
from lcflow.serving.config import ServiceConfig

# torch and lcflow.transport (which imports torch) are imported in the functions that use them:
# `lcflow --help` builds this parser and must not import torch.
if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

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


def bench_case(
    target: str, mode: str, tokens: int, dtype: str, quantize: str, config: TransportBenchConfig
) -> dict:
    codec = codec_of(config, quantize)
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
# smollm2-to-gemma3-lcf and the full-width LCF-X card gemma3-to-gemma3-lcfx, whose packet shapes
# the bench sends): what the services' default path (--quantize card, --codec auto) is offered
# for those adapters. The bench's auto runs are offered these.
CARD_CODECS = {"lcf": ("none", "int8", "int4"), "lcfx": ("none", "int8")}
DEFAULT_CODEC_SETTING = ServiceConfig.codec  # the sharer's --codec default ("auto")


def offered_schemes(mode: str, quantize: list[str]) -> tuple[str, ...]:
    """What the bench's auto run of a `mode` payload is offered: the card's codecs that this run's
    --quantize includes (all of them: the services' default path), or else --quantize itself."""
    return tuple(q for q in CARD_CODECS[mode] if q in quantize) or tuple(quantize)


def run_transport_bench(config: TransportBenchConfig) -> dict:
    """Every (mode, T, dtype, quantization) case on loopback, then over each emulated link; returns
    the JSON-ready report (`results`: the loopback stages; `links`: one record per case and link)."""
    from lcflow.provision.loading import pick_device  # keeps --help fast
    from lcflow.transport.memory import keep_freed_memory  # keeps --help fast

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

    unknown = sorted(set(config.link_codecs) - set(CODEC_SETTINGS))
    if unknown or not config.link_codecs:
        raise UsageError(f"--link-codecs: use some of {', '.join(CODEC_SETTINGS)}, not {args.link_codecs!r}")
    for link in config.links:
        if link != "loopback":
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
