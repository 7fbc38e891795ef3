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
import functools
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# torch, transformers and the models are imported in the functions that use them:
# `lcflow --help` builds this parser and must not import torch.
if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache, PretrainedConfig

    from lcflow.adapter.adapter import LatentAdapter

log = logging.getLogger(__name__)

LABEL = "random weights, speed only, no accuracy"
METHODS = ("text", "lcf", "lcfx", "lcfx-spans")
LATENT_METHODS = METHODS[1:]
STAGES = {
    "text": ("sharer_prefill", "message_decode", "receiver_prefill", "first_token"),
    "lcf": ("sharer_prefill", "encode", "receiver_prefill", "fuse", "first_token"),
    "lcfx": ("sharer_prefill", "encode", "prefix_decode", "receiver_prefill", "first_token"),
    "lcfx-spans": ("sharer_prefill", "encode", "prefix_decode", "receiver_prefill", "first_token"),
}
# The span packet's selection head: one head, a third of the way through the sharer (the
# shipped Gemma3-270M span adapters select with layer 5 of 18, chosen by `lcflow heads`). The
# question runs only through the layers up to it, so its depth is what costs time.
SPAN_SELECTION_DEPTH = 1 / 3
SPAN_HEAD_TOKENS = 8  # the receiver's template before the document slot (BOS, role markers)
TEXT_BYTES_PER_TOKEN = 4  # UTF-8 bytes of an average BPE token of English text
LATENT_DTYPE = "bfloat16"  # the torch dtype latents travel as
CHARS_PER_TOKEN = 4  # synthetic character spans for LCF's span alignment


@dataclass
class LatencyBenchConfig:
    context_lengths: list[int] = field(default_factory=lambda: [128, 512, 1024, 2048])
    message_tokens: list[int] = field(default_factory=lambda: [16, 64, 256])
    question_tokens: int = 32  # the receiver's question, in every method
    receiver_context_tokens: int = 64  # the receiver's own context (text and LCF-X)
    repeats: int = 3
    bottleneck: int = 128  # b
    slots: int = 32  # m, LCF-X
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0


# ---------------------------------------------------------------------------------------------- models


def load_config_json(path: str | Path) -> PretrainedConfig:
    """A transformers config from a config.json (keys starting with "_" are notes, dropped)."""
    from transformers import AutoConfig

    data = json.loads(Path(path).read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    return AutoConfig.for_model(data.pop("model_type"), **data)


@dataclass
class Pair:
    """Random-weight sharer and receiver with untrained LCF and LCF-X adapters of their identities."""

    names: tuple[str, str]
    sharer: torch.nn.Module
    receiver: torch.nn.Module
    lcf: LatentAdapter
    lcfx: LatentAdapter
    spans: LatentAdapter  # LCF-X with a span packet

    def describe(self) -> dict:
        out = {}
        for role, name, model in (
            ("sharer", self.names[0], self.sharer),
            ("receiver", self.names[1], self.receiver),
        ):
            cfg = model.config
            out[role] = {
                "name": name,
                "weights": LABEL,
                "parameters": sum(p.numel() for p in model.parameters()),
                "layers": cfg.num_hidden_layers,
                "hidden_size": cfg.hidden_size,
                "kv_heads": cfg.num_key_value_heads,
                "vocab_size": cfg.vocab_size,
            }
        out["adapters"] = {
            mode: {"retained_layers": len(a.config.retained_layers), **a.parameter_counts()}
            for mode, a in (("lcf", self.lcf), ("lcfx", self.lcfx), ("lcfx-spans", self.spans))
        }
        return out


def build_pair(
    config: LatencyBenchConfig,
    configs: tuple[PretrainedConfig, PretrainedConfig] | None = None,
    names: tuple[str, str] | None = None,
) -> Pair:
    """The paper pair (configs None) or models built from the given configs, all random weights;
    `names` default to the paper pair's."""
    import torch
    from transformers import AutoModelForCausalLM

    from lcflow.adapter.adapter import LatentAdapter  # keeps --help fast
    from lcflow.provision.loading import pick_device  # keeps --help fast
    from lcflow.testing.paper_pair import (  # keeps --help fast
        PAPER_PAIR_TOKENIZER_HASH,
        RECEIVER_NAME,
        SHARER_NAME,
        build_paper_pair_models,
        identity_from_config,
        paper_pair_configs,
    )

    names = names or (SHARER_NAME, RECEIVER_NAME)
    device, dtype = pick_device(config.device), getattr(torch, config.dtype)
    if configs is None:
        sharer, receiver = build_paper_pair_models(dtype, config.seed)
        configs = paper_pair_configs()
    else:
        torch.manual_seed(config.seed)
        sharer, receiver = (AutoModelForCausalLM.from_config(c, dtype=dtype).eval() for c in configs)
        for model in (sharer, receiver):
            model.requires_grad_(False)
    identities = [
        identity_from_config(c, n, PAPER_PAIR_TOKENIZER_HASH) for c, n in zip(configs, names, strict=True)
    ]
    adapters = {
        mode: LatentAdapter.for_models(
            mode, *identities, bottleneck=config.bottleneck, slots=config.slots
        ).requires_grad_(False)
        for mode in ("lcf", "lcfx")
    }
    selection_layer = int(sharer.config.num_hidden_layers * SPAN_SELECTION_DEPTH)
    adapters["lcfx-spans"] = LatentAdapter.for_models(
        "lcfx",
        *identities,
        bottleneck=config.bottleneck,
        slots=config.slots,
        packet="spans",
        selection="tokens",  # no text here to cut into sentences; the cost is the same
        selection_heads=[[selection_layer, 0]],
    ).requires_grad_(False)
    # A fresh span map is all zeros (it starts from a fitted alignment), which would make every
    # packet zeros and its zstd bytes meaningless: random values instead, as untrained as the rest.
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for parameter in adapters["lcfx-spans"].parameters():
            parameter.normal_(std=0.02, generator=generator)
    # The adapter runs in the models' dtype, on their device, as a served one would.
    adapters = {mode: a.to(device=device, dtype=dtype).eval() for mode, a in adapters.items()}
    return Pair(
        names,
        sharer.to(device),
        receiver.to(device),
        adapters["lcf"],
        adapters["lcfx"],
        adapters["lcfx-spans"],
    )


# ---------------------------------------------------------------------------------------------- timing


class StageClock:
    """Times the stages of one run; waits for the GPU before reading the clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}

    def __call__(self, stage: str, fn: Callable[[], object]):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.times[stage] = (time.perf_counter() - start) * 1000.0
        return result


def _no_grad(fn: Callable) -> Callable:
    """`@torch.no_grad()`, importing torch when `fn` is first called rather than at import."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def random_ids(generator: torch.Generator, model, length: int) -> torch.Tensor:
    """[1, length] random token ids of `model`'s vocabulary (content is irrelevant for speed)."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
    return ids.to(model.device)


def special_token(model) -> int:
    """BOS, else PAD, else EOS of the model's config: LCF-X's filler token, and generate's pad id."""
    cfg = model.config
    for token_id in (cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id):
        token_id = token_id[0] if isinstance(token_id, list) else token_id
        if token_id is not None:
            return int(token_id)
    return 0


@_no_grad
def generate_exactly(model, input_ids: torch.Tensor, cache: DynamicCache, tokens: int) -> torch.Tensor:
    """Greedy `generate` continuing from `cache`, exactly `tokens` new tokens (EOS cannot stop it)."""
    import torch

    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=cache,
        do_sample=False,
        min_new_tokens=tokens,
        max_new_tokens=tokens,
        pad_token_id=special_token(model),
    )
    return output[:, input_ids.shape[1] :]


@_no_grad
def prefill_captured(model, ids: torch.Tensor):
    """What Sharer.prefill does after tokenising: full cache, then keys with RoPE removed."""
    from lcflow.core.kv import capture_kv, full_cache, prefill  # keeps --help fast

    return capture_kv(model, prefill(model, ids, full_cache()))


@_no_grad
def run_text(pair: Pair, generator, context: int, message: int, config: LatencyBenchConfig, clock) -> None:
    from lcflow.core.kv import prefill  # keeps --help fast

    sharer, receiver = pair.sharer, pair.receiver
    sharer_ids = random_ids(generator, sharer, context + config.question_tokens)
    sharer_cache = clock("sharer_prefill", lambda: prefill(sharer, sharer_ids[:, :-1]))
    written = clock("message_decode", lambda: generate_exactly(sharer, sharer_ids, sharer_cache, message))
    assert written.shape[1] == message
    # The receiver reads its own context, the message (as N ids of its own vocabulary), the question.
    prompt_tokens = config.receiver_context_tokens + message + config.question_tokens
    receiver_ids = random_ids(generator, receiver, prompt_tokens)
    receiver_cache = clock("receiver_prefill", lambda: prefill(receiver, receiver_ids[:, :-1]))
    clock("first_token", lambda: generate_exactly(receiver, receiver_ids, receiver_cache, 1))


@_no_grad
def run_lcf(pair: Pair, generator, context: int, config: LatencyBenchConfig, clock) -> dict:
    import torch

    from lcflow.core.kv import RopeCodec, prefill  # keeps --help fast
    from lcflow.core.tokens import align_spans  # keeps --help fast

    sharer, receiver, adapter = pair.sharer, pair.receiver, pair.lcf
    sharer_ids = random_ids(generator, sharer, context)
    captured = clock("sharer_prefill", lambda: prefill_captured(sharer, sharer_ids))
    encoder = adapter.encoder
    latents = clock("encode", lambda: {t: encoder.encode_layer(captured, t) for t in encoder.layers})
    receiver_ids = random_ids(generator, receiver, context + config.question_tokens)
    cache = clock("receiver_prefill", lambda: prefill(receiver, receiver_ids[:, :-1]))
    spans = torch.arange(context).unsqueeze(1) * CHARS_PER_TOKEN + torch.tensor([0, CHARS_PER_TOKEN])
    rope = RopeCodec(receiver)

    def fuse() -> None:
        alignment = align_spans(spans, spans)
        aligned = {t: alignment.apply(z) for t, z in latents.items()}
        positions = torch.arange(context, device=receiver.device)
        adapter.decoder.fuse(cache, rope, aligned, positions, alignment.covered.to(receiver.device))

    clock("fuse", fuse)
    clock("first_token", lambda: generate_exactly(receiver, receiver_ids, cache, 1))
    return {"latents": latents, "token_spans": spans.to(torch.int32)}


@_no_grad
def run_lcfx(pair: Pair, generator, context: int, config: LatencyBenchConfig, clock, filler) -> dict:
    import torch

    from lcflow.core.kv import RopeCodec, run_backbone  # keeps --help fast

    sharer, receiver, adapter = pair.sharer, pair.receiver, pair.lcfx
    sharer_ids = random_ids(generator, sharer, context)
    captured = clock("sharer_prefill", lambda: prefill_captured(sharer, sharer_ids))
    encoder = adapter.encoder
    slots = clock("encode", lambda: {t: encoder.encode_layer(captured, t) for t in encoder.layers})
    rope = RopeCodec(receiver)
    cache = clock("prefix_decode", lambda: adapter.decoder.prefix_cache(receiver, rope, filler, slots))
    m = config.slots
    prompt = random_ids(generator, receiver, config.receiver_context_tokens + config.question_tokens)
    filler_ids = torch.full((1, m), special_token(receiver), dtype=torch.long, device=receiver.device)
    input_ids = torch.cat([filler_ids, prompt], dim=1)
    clock("receiver_prefill", lambda: run_backbone(receiver, input_ids[:, m:-1], cache))
    clock("first_token", lambda: generate_exactly(receiver, input_ids, cache, 1))
    return {"latents": slots, "token_spans": None}


@_no_grad
def run_lcfx_spans(pair: Pair, generator, context: int, config: LatencyBenchConfig, clock, head) -> dict:
    """The span packet as Sharer.encode_layers and Receiver.prepare_spans run it; `head` is the
    receiver's template head (ids, cache), prefilled once as Receiver caches it."""
    import torch

    from lcflow.core.kv import RopeCodec, run_backbone  # keeps --help fast
    from lcflow.packets.placement import SlotLayout, slot_cache  # keeps --help fast

    sharer, receiver, adapter = pair.sharer, pair.receiver, pair.spans
    sharer_ids = random_ids(generator, sharer, context)
    question = random_ids(generator, sharer, config.question_tokens)
    captured = clock("sharer_prefill", lambda: prefill_captured(sharer, sharer_ids))
    encoder = adapter.encoder

    def encode() -> dict:
        positions = encoder.select_by_ids(sharer, captured, question)
        return {t: encoder.encode_layer(captured, t, positions) for t in encoder.layers}

    latents = clock("encode", encode)
    head_ids, head_cache = head
    tail = random_ids(generator, receiver, config.receiver_context_tokens + config.question_tokens)
    layout = SlotLayout(head_ids, tail)
    rope = RopeCodec(receiver)

    def decode():
        keys, values = adapter.decoder.entries(latents)
        return slot_cache(receiver, rope, layout, keys, values, head_cache)

    cache = clock("prefix_decode", decode)
    rows = next(iter(latents.values())).shape[1]
    filler = torch.full((1, rows), special_token(receiver), dtype=torch.long, device=receiver.device)
    input_ids = torch.cat([head_ids, filler, tail], dim=1)
    clock("receiver_prefill", lambda: run_backbone(receiver, tail[:, :-1], cache))
    clock("first_token", lambda: generate_exactly(receiver, input_ids, cache, 1))
    return {"latents": latents, "token_spans": None}


# ---------------------------------------------------------------------------------------------- bytes


def latent_bytes(mode: str, payload: dict) -> tuple[int, int]:
    """(raw bytes at bfloat16 plus token spans, bytes on the wire as PacketWriter packs them)."""
    import torch

    from lcflow.transport import CodecConfig, LatentPacket, PacketWriter  # keeps --help fast

    dtype = getattr(torch, LATENT_DTYPE)
    layers = {t: {"latent": z.detach().to("cpu", dtype).contiguous()} for t, z in payload["latents"].items()}
    shared = {"token_spans": payload["token_spans"]} if payload["token_spans"] is not None else {}
    packet = LatentPacket(mode, "bench-latency", "sharer", "receiver", list(layers), layers, shared)
    writer = PacketWriter.for_packet(packet, CodecConfig())
    if shared:
        for _ in writer.shared(shared):
            pass
    for layer in packet.layers:
        for _ in writer.layer(layer, layers[layer]):
            pass
    return packet.raw_bytes(), writer.stats.bytes_wire


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
