"""What `lcflow bench latency` times: the model pair (random weights at the models' real shapes),
a stage clock, one handoff of each method run stage by stage, and the bytes each method sends.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# torch, transformers and the models are imported in the functions that use them:
# `lcflow --help` builds this parser and must not import torch.
if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache, PretrainedConfig

    from lcflow.adapter.adapter import LatentAdapter


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
