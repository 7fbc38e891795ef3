"""`lcflow bench latency`: time to first answer token of TEXT, LCF and LCF-X, stage by stage.

The models have the paper pair's shapes (sharer Qwen2.5-0.5B-Instruct, receiver Qwen3-0.6B)
with RANDOM WEIGHTS: the numbers are speed only, never accuracy. No tokenizer is involved:
every prompt is random token ids of the requested length, and the adapters (LCF b=128,
LCF-X b=128 m=32, slots and spans) are untrained; neither changes how long anything takes.

    text   sharer_prefill (context + question) -> message_decode (exactly N tokens)
           -> receiver_prefill (own context + message + question) -> first_token
    lcf    sharer_prefill (context) -> encode (a latent per token and layer)
           -> receiver_prefill (the same context + question) -> fuse -> first_token
    lcfx   sharer_prefill (context) -> encode (pooled into m slots)
           -> prefix_decode (m prefix entries) -> receiver_prefill (own context + question)
           -> first_token
    lcfx-spans  the span packet the shipped LCF-X adapters send (lcflow.adapter.spans):
           sharer_prefill (context) -> encode (the question's attention in one selection head
           picks m positions, each translated per token) -> prefix_decode (m entries after the
           receiver's template head) -> receiver_prefill (own context + question) -> first_token

Each stage is the median of --repeats timed runs (after one warm-up of each method); the
time to first token is the median of the per-run totals, all stages run one after another
in one process (no overlap of sharer and receiver, no network: see `lcflow bench transport`).
Bytes sent: text ~4 bytes per message token; latents at bfloat16 (LCF also sends int32
token spans), and as packed by the real wire format (zstd + byte-shuffle) of untrained
latents. Growth is a least-squares slope over the context lengths (per 1k context tokens)
and over the message lengths (per message token).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from lcflow.bench.latency_runs import (
    LABEL,
    LATENT_METHODS,
    SPAN_HEAD_TOKENS,
    STAGES,
    TEXT_BYTES_PER_TOKEN,
    LatencyBenchConfig,
    Pair,
    StageClock,
    build_pair,
    latent_bytes,
    load_config_json,
    random_ids,
    run_lcf,
    run_lcfx,
    run_lcfx_spans,
    run_text,
    special_token,
)

# torch, transformers and the models are imported in the functions that use them:
# `lcflow --help` builds this parser and must not import torch.
if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- bench


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return covariance / sum((x - mean_x) ** 2 for x in xs)


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def growth(results: list[dict], config: LatencyBenchConfig) -> dict:
    """Slopes of time to first token and bytes: per 1k context tokens, and per message token."""
    series = [(method, None) for method in LATENT_METHODS] + [("text", n) for n in config.message_tokens]
    with_context = []
    for method, message in series:
        rows = [r for r in results if r["method"] == method and r.get("message_tokens") == message]
        xs = [r["context_tokens"] for r in rows]
        entry = {"method": method, "message_tokens": message}
        entry["ttft_ms_per_1k_context_tokens"] = _rounded(slope(xs, [1000 * r["ttft_ms"] for r in rows]))
        entry["bytes_per_1k_context_tokens"] = _rounded(slope(xs, [1000 * r["bytes"] for r in rows]), 1)
        with_context.append(entry)
    with_message = []
    for context in config.context_lengths:
        rows = [r for r in results if r["method"] == "text" and r["context_tokens"] == context]
        xs = [r["message_tokens"] for r in rows]
        with_message.append(
            {
                "method": "text",
                "context_tokens": context,
                "ttft_ms_per_message_token": _rounded(slope(xs, [r["ttft_ms"] for r in rows])),
                "bytes_per_message_token": _rounded(slope(xs, [r["bytes"] for r in rows]), 1),
            }
        )
    return {"with_context": with_context, "with_message": with_message}


def machine_info(device: torch.device) -> dict:
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _result(method: str, context: int, message: int | None, runs: list[dict[str, float]], nbytes: int, wire):
    return {
        "method": method,
        "context_tokens": context,
        "message_tokens": message,
        "stages_ms": {stage: _median([run[stage] for run in runs]) for stage in STAGES[method]},
        "ttft_ms": _median([sum(run.values()) for run in runs]),
        "bytes": nbytes,
        "wire_bytes": wire,
    }


def run_latency_bench(config: LatencyBenchConfig, pair: Pair) -> dict:
    """Every method at every context length (text also at every message length); JSON-ready."""
    import torch

    from lcflow.adapter.lcfx import filler_prefix  # keeps --help fast
    from lcflow.core.kv import prefill  # keeps --help fast
    from lcflow.provision.loading import pick_device  # keeps --help fast

    device = pick_device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    # The neutral LCF-X base prefix and the span packet's template head are built once, as
    # Receiver caches them, so they are not timed.
    filler = filler_prefix(pair.receiver, special_token(pair.receiver), config.slots)
    head_ids = random_ids(generator, pair.receiver, SPAN_HEAD_TOKENS)
    head = (head_ids, prefill(pair.receiver, head_ids))

    def timed(run: Callable[[StageClock], object]) -> tuple[list[dict[str, float]], object]:
        runs, out = [], None
        for _ in range(config.repeats):
            clock = StageClock(device)
            out = run(clock)
            runs.append(clock.times)
        return runs, out

    # One warm-up of each method at the smallest size: first calls pay for lazy initialisation.
    smallest, shortest = min(config.context_lengths), min(config.message_tokens)
    run_text(pair, generator, smallest, shortest, config, StageClock(device))
    run_lcf(pair, generator, smallest, config, StageClock(device))
    run_lcfx(pair, generator, smallest, config, StageClock(device), filler)
    run_lcfx_spans(pair, generator, smallest, config, StageClock(device), head)

    results = []
    for context in config.context_lengths:
        for message in config.message_tokens:
            log.info("bench latency: text, context %d, message %d", context, message)
            runs, _ = timed(
                lambda clock, t=context, n=message: run_text(pair, generator, t, n, config, clock)
            )
            text_bytes = TEXT_BYTES_PER_TOKEN * message  # sent as is, in the request
            results.append(_result("text", context, message, runs, text_bytes, text_bytes))
        log.info("bench latency: lcf, context %d", context)
        runs, payload = timed(lambda clock, t=context: run_lcf(pair, generator, t, config, clock))
        results.append(_result("lcf", context, None, runs, *latent_bytes("lcf", payload)))
        log.info("bench latency: lcfx, context %d", context)
        runs, payload = timed(lambda clock, t=context: run_lcfx(pair, generator, t, config, clock, filler))
        results.append(_result("lcfx", context, None, runs, *latent_bytes("lcfx", payload)))
        log.info("bench latency: lcfx with a span packet, context %d", context)
        runs, payload = timed(
            lambda clock, t=context: run_lcfx_spans(pair, generator, t, config, clock, head)
        )
        results.append(_result("lcfx-spans", context, None, runs, *latent_bytes("lcfx", payload)))

    return {
        "bench": "latency",
        "label": LABEL,
        "models": pair.describe(),
        "machine": machine_info(device),
        "config": asdict(config),
        "stages": {method: list(stages) for method, stages in STAGES.items()},
        "results": results,
        "growth": growth(results, config),
    }


# ---------------------------------------------------------------------------------------------- CLI


def _method_label(result: dict) -> str:
    if result["method"] == "text":
        return f"text N={result['message_tokens']}"
    return {"lcf": "LCF", "lcfx": "LCF-X", "lcfx-spans": "LCF-X spans"}[result["method"]]


def format_table(report: dict) -> str:
    models = report["models"]
    lines = [
        f"{models['sharer']['name']} -> {models['receiver']['name']}: {LABEL.upper()}",
        f"{'method':12} {'context':>7} {'TTFT ms':>10} {'bytes':>10} {'wire':>10}  stages (ms)",
    ]
    for r in report["results"]:
        stages = "  ".join(f"{stage} {ms:.1f}" for stage, ms in r["stages_ms"].items())
        lines.append(
            f"{_method_label(r):12} {r['context_tokens']:>7} {r['ttft_ms']:>10.1f} {r['bytes']:>10} {r['wire_bytes']:>10}  {stages}"
        )
    lines.append("")
    lines.append("growth with context length (least-squares slope per 1k context tokens):")
    for g in report["growth"]["with_context"]:
        ms, nbytes = g["ttft_ms_per_1k_context_tokens"], g["bytes_per_1k_context_tokens"]
        if ms is None:
            lines.append("  (needs two or more context lengths)")
            break
        lines.append(f"  {_method_label(g):12} {ms:10.1f} ms   {nbytes:12.0f} bytes")
    lines.append("growth with message length (text, slope per message token):")
    for g in report["growth"]["with_message"]:
        if g["ttft_ms_per_message_token"] is None:
            lines.append("  (needs two or more message lengths)")
            break
        lines.append(
            f"  context {g['context_tokens']:>6}: {g['ttft_ms_per_message_token']:8.2f} ms, "
            f"{g['bytes_per_message_token']:.0f} bytes"
        )
    machine = report["machine"]
    lines.append(
        f"machine: {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, "
        f"{machine['device']}, {machine['platform']}"
    )
    return "\n".join(lines)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive = _at_least(1)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "latency",
        help="time to first answer token of text, LCF and LCF-X (random-weight paper pair: speed only)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = LatencyBenchConfig()
    p.add_argument(
        "--paper-pair",
        action="store_true",
        help="the paper's pair by shape, Qwen2.5-0.5B-Instruct -> Qwen3-0.6B (the default)",
    )
    p.add_argument("--sharer", help="instead of the paper pair: the sharer's config.json (random weights)")
    p.add_argument(
        "--receiver", help="instead of the paper pair: the receiver's config.json (random weights)"
    )
    p.add_argument("--context-lengths", type=_positive, nargs="+", default=defaults.context_lengths)
    p.add_argument(
        "--message-tokens",
        type=_positive,
        nargs="+",
        default=defaults.message_tokens,
        help="lengths N of the text method's message (exactly N generated tokens)",
    )
    p.add_argument("--question-tokens", type=_positive, default=defaults.question_tokens)
    p.add_argument(
        "--receiver-context-tokens",
        type=_at_least(0),
        default=defaults.receiver_context_tokens,
        help="the receiver's own context (text and LCF-X)",
    )
    p.add_argument("--repeats", type=_positive, default=defaults.repeats, help="timed runs (median reported)")
    p.add_argument("--bottleneck", type=_positive, default=defaults.bottleneck, help="latent width b")
    p.add_argument("--slots", type=_positive, default=defaults.slots, help="LCF-X slots m")
    p.add_argument("--device", default=defaults.device, help="auto (cuda if present), cpu or cuda")
    p.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", help="write the JSON report here")
    p.set_defaults(func=run)


def _configs(args) -> tuple[tuple[PretrainedConfig, PretrainedConfig] | None, tuple[str, str]]:
    from lcflow.testing.paper_pair import RECEIVER_NAME, SHARER_NAME  # keeps --help fast

    if bool(args.sharer) != bool(args.receiver):
        raise SystemExit("give both --sharer and --receiver config files, or neither (the paper pair)")
    if args.sharer:
        if args.paper_pair:
            raise SystemExit("--paper-pair and --sharer/--receiver exclude each other")
        configs = (load_config_json(args.sharer), load_config_json(args.receiver))
        return configs, (f"random:{Path(args.sharer).stem}", f"random:{Path(args.receiver).stem}")
    return None, (SHARER_NAME, RECEIVER_NAME)


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = LatencyBenchConfig(
        context_lengths=sorted(set(args.context_lengths)),
        message_tokens=sorted(set(args.message_tokens)),
        question_tokens=args.question_tokens,
        receiver_context_tokens=args.receiver_context_tokens,
        repeats=args.repeats,
        bottleneck=args.bottleneck,
        slots=args.slots,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        seed=args.seed,
    )
    configs, names = _configs(args)
    report = run_latency_bench(config, build_pair(config, configs, names))
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"written to {args.out}")
    return 0
