"""A compressed span adapter from a full-width one, in closed form (lcflow.packets.narrowing).

    rows = packet_rows(teacher, sharer_pair, samples)          # once, for any number of widths
    metrics = receiver_metrics(receiver_pair, samples, slots)  # optional: the receiver's metric
    adapter, kept = narrowed_adapter(teacher, rows, bottleneck=128, metrics=metrics)

Runs the teacher's sharer half over training samples exactly as a handoff does (prefill, select
with the question, encode), keeps every packet row per receiver layer, and replaces each layer's
E, D and mu_y by their rank-b narrowing. Selection, heads, slots and layer map are the teacher's;
only the width of a row changes. With `metrics`, the directions are those that matter most to
the receiver (its queries over the samples' prompts at their distances from the packet's rows,
its output projection: lcflow.packets.narrowing.receiver_metric). No backward pass.
"""

from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from lcflow.adapter import LatentAdapter
from lcflow.core.kv import RopeCodec, decoder_backbone, run_backbone
from lcflow.handoff.pair import Sharer, receiver_view
from lcflow.packets.narrowing import narrow_map, receiver_metric
from lcflow.packets.placement import slot_layout
from lcflow.packets.selection import capture_queries
from lcflow.tasks import format_question_prompt


@torch.no_grad()
def packet_rows(teacher: LatentAdapter, sharer_pair: tuple, samples) -> dict[int, torch.Tensor]:
    """{receiver layer: [rows of every sample's packet, B]} from the teacher's encoder."""
    model, tokenizer = sharer_pair
    sharer = Sharer(model, tokenizer, teacher.encoder, teacher.config)
    rows: dict[int, list[torch.Tensor]] = {t: [] for t in teacher.encoder.layers}
    for sample in tqdm(samples, desc="packet rows", unit="sample"):
        prompt = format_question_prompt(sample, include_context=False)
        context = sharer.prefill(sample.sharer_context)
        receiver_text = receiver_view(sample.receiver_context, prompt)
        for layer, z in sharer.encode_layers(context, receiver_text, question=prompt):
            rows[layer].append(z[0].float().cpu())
    return {t: torch.cat(parts) for t, parts in rows.items()}


@torch.no_grad()
def receiver_metrics(receiver_pair: tuple, samples, slots: int) -> dict[int, torch.Tensor]:
    """{receiver layer: A [d, d]} (lcflow.packets.narrowing.receiver_metric): the receiver's
    sensitivity to errors in the K/V rows of a `slots`-row packet.

    Per sample, the receiver reads its own input around the packet's slot (slot_layout: the
    template head, then the packet's rows, then its context and question) without the packet,
    and its queries q (no RoPE) at the tail's positions are kept. Tail query i sits
    slots + i - j positions after packet row j, so

        C[g] = sum over the heads h reading kv head g, mean over samples, tail queries i
               and rows j, of u u^T,   u = R(slots + i - j) q[h, i]

    with the layer's own RoPE (RopeCodec); A's values half comes from the layer's o_proj.
    """
    from transformers import DynamicCache  # the cache run_backbone fills and we drop

    model, tokenizer = receiver_pair
    rope = RopeCodec(model)
    layers = decoder_backbone(model).layers
    attention = layers[0].self_attn
    heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
    head_dim, group = attention.head_dim, heads // kv_heads
    moments: dict[int, torch.Tensor] = {}
    count = 0
    for sample in tqdm(samples, desc="receiver queries", unit="sample"):
        layout = slot_layout(
            tokenizer, format_question_prompt(sample, include_context=False), sample.receiver_context
        )
        tail = layout.tail_ids.shape[1]
        with capture_queries(model, len(layers)) as queries:
            run_backbone(model, torch.cat([layout.head_ids, layout.tail_ids], dim=1), DynamicCache())
        # every (query i, row j) pair, row-major: the distance slots + i - j
        distances = (torch.arange(tail)[:, None] + slots - torch.arange(slots)[None, :]).reshape(1, -1)
        for index in range(len(layers)):
            q = queries[index][:, :, -tail:].float()  # [1, heads, tail, D]
            u = rope.rotate(q.repeat_interleave(slots, dim=2), distances, index)  # each query once per row
            u = u[0].reshape(kv_heads, group * tail * slots, head_dim).double()
            moments[index] = moments.get(index, 0) + u.transpose(1, 2) @ u
        count += tail * slots
    return {
        index: receiver_metric(moments[index] / count, layer.self_attn.o_proj.weight, head_dim)
        for index, layer in enumerate(layers)
    }


def narrowed_adapter(
    teacher: LatentAdapter,
    rows: dict[int, torch.Tensor],
    bottleneck: int,
    balance: bool = True,
    metrics: dict[int, torch.Tensor] | None = None,
) -> tuple[LatentAdapter, dict[int, tuple[float, float]]]:
    """(the teacher narrowed to `bottleneck`, {layer: (keys' variance kept, values' kept)});
    `rows`: the teacher's packet rows per layer (packet_rows); `metrics`: receiver_metrics, or
    None to count every K/V number alike."""
    if teacher.config.mode != "lcfx" or teacher.config.packet != "spans":
        raise ValueError("only a span-packet LCF-X adapter can be narrowed")
    if bottleneck >= teacher.config.bottleneck:
        raise ValueError(
            f"--bottleneck {bottleneck} is not narrower than the adapter's {teacher.config.bottleneck}"
        )
    config = copy.deepcopy(teacher.config)
    config.bottleneck = bottleneck
    student = LatentAdapter(config)
    kept = {}
    with torch.no_grad():
        for t in config.retained_layers:
            key = str(t)
            fitted = narrow_map(
                rows[t],
                teacher.encoder.proj[key].float(),
                teacher.decoder.proj[key].float(),
                teacher.decoder.mu[key].float(),
                bottleneck,
                balance,
                None if metrics is None else metrics[t],
            )
            student.encoder.mu[key].copy_(teacher.encoder.mu[key])
            student.encoder.proj[key].copy_(fitted.encoder)
            student.decoder.mu[key].copy_(fitted.mu_y)
            student.decoder.proj[key].copy_(fitted.decoder)
            kept[t] = (round(fitted.kept_k, 4), round(fitted.kept_v, 4))
    return student, kept
