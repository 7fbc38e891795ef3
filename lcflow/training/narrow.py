"""A compressed span adapter from a full-width one, in closed form (lcflow.packets.narrowing).

    rows = packet_rows(teacher, sharer_pair, samples)          # once, for any number of widths
    adapter, kept = narrowed_adapter(teacher, rows, bottleneck=128)

Runs the teacher's sharer half over training samples exactly as a handoff does (prefill, select
with the question, encode), keeps every packet row per receiver layer, and replaces each layer's
E, D and mu_y by their rank-b narrowing. Selection, heads, slots and layer map are the teacher's;
only the width of a row changes. No backward pass.
"""

from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from lcflow.adapter import LatentAdapter
from lcflow.handoff.pair import Sharer, receiver_view
from lcflow.packets.narrowing import narrow_map
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


def narrowed_adapter(
    teacher: LatentAdapter, rows: dict[int, torch.Tensor], bottleneck: int, balance: bool = True
) -> tuple[LatentAdapter, dict[int, tuple[float, float]]]:
    """(the teacher narrowed to `bottleneck`, {layer: (keys' variance kept, values' kept)});
    `rows`: the teacher's packet rows per layer (packet_rows)."""
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
            )
            student.encoder.mu[key].copy_(teacher.encoder.mu[key])
            student.encoder.proj[key].copy_(fitted.encoder)
            student.decoder.mu[key].copy_(fitted.mu_y)
            student.decoder.proj[key].copy_(fitted.decoder)
            kept[t] = (round(fitted.kept_k, 4), round(fitted.kept_v, 4))
    return student, kept
