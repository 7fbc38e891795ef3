"""Is an LCF-X packet about its document, and does the receiver read it? Measured on held-out samples.

The first LCF-X design failed silently: its packets barely depended on the input, and the
receiver answered from its prior. Three numbers catch that, per adapter:

    between-sample share[t] = sum_d Var_s( mean_r z_s[t][r, d] )  /  sum_d Var_(s,r)( z_s[t][r, d] )
        z_s[t]: sample s's packet for receiver layer t, [rows, b]. The share of the packet's
        variance that says *which* document it came from; near 0, every sample sends the same.
    prefix attention  = attention mass the receiver's last prompt token (the one that produces
        the first answer token) puts on the packet's entries: mean over layers and heads
    answer NLL        = cross-entropy of the answer's tokens (nats per token)
    answer recall     = share of samples whose selected positions cover every character of the
        answer in the sharer's document (samples whose answer is not in it, two-hop ones, are
        not counted): whether selection finds what the question asks for at all

Attention and NLL are taken twice: with the sample's own packet and with another sample's
(its document, its question), decoded for this sample's prompt. A packet that is read changes
the answer's NLL; one that is only attended to (or ignored) does not.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch

from lcflow.handoff.pair import Latents, Receiver, Sharer, receiver_view
from lcflow.packets.placement import slot_layout
from lcflow.packets.selection import answer_selected, question_attention
from lcflow.tasks import QASample, format_question_prompt
from lcflow.training.train import answer_ids, answer_loss


@dataclass
class PacketReading:
    """One sample read with one packet (its own or another sample's)."""

    sample_id: str
    packet: str  # "right" or "wrong"
    rows: int
    prefix_attention: float
    answer_nll: float


@torch.no_grad()
def packet_for(sharer: Sharer, sample: QASample) -> tuple[Latents, bool | None]:
    """What the sharer sends for this sample (its document, selected with the receiver's
    question), and whether the selection covers the answer (`answer_selected`)."""
    prompt = format_question_prompt(sample, include_context=False)
    context = sharer.prefill(sample.sharer_context)
    receiver_text = receiver_view(sample.receiver_context, prompt)
    positions = sharer.select(context, receiver_text, prompt)
    latents = sharer.encode(context, receiver_text, prompt, positions)
    return latents, answer_selected(sample, context.spans, positions)


def between_sample_share(packets: list[Latents]) -> dict[int, float]:
    """Per receiver layer: the share of the packets' variance that lies between samples."""
    shares = {}
    for layer in packets[0].layers:
        rows = [p.layers[layer][0].float() for p in packets]  # [rows, b] each
        means = torch.stack([r.mean(dim=0) for r in rows])
        total = torch.cat(rows).var(dim=0).sum()
        shares[layer] = float(means.var(dim=0).sum() / total) if total > 0 else 0.0
    return shares


@torch.no_grad()
def read_packet(receiver: Receiver, sample: QASample, latents: Latents, packet: str) -> PacketReading:
    """Decode `latents` for this sample's prompt; the attention on them and the answer's NLL."""
    prompt = format_question_prompt(sample, include_context=False)
    prepared = receiver.prepare_lcfx(latents, prompt, sample.receiver_context)
    start = slot_layout(receiver.tokenizer, prompt, sample.receiver_context).head_tokens
    rows = next(iter(latents.layers.values())).shape[1]
    cached = prepared.cache.get_seq_length()
    throwaway = copy.deepcopy(prepared.cache)
    scores = question_attention(receiver.model, throwaway, prepared.input_ids[:, -1:], cached, restore=False)
    target = answer_ids(receiver.tokenizer, sample.answers[0])
    nll = answer_loss(receiver, prepared, target).item()
    return PacketReading(sample.id, packet, rows, float(scores[start : start + rows].sum()), nll)


def diagnose(sharer: Sharer, receiver: Receiver, samples: list[QASample]) -> dict:
    """Every sample read with its own packet and with the next sample's; the summary and records."""
    if receiver.config is None or receiver.config.packet != "spans":
        raise ValueError("packet diagnostics read span-packet LCF-X adapters (packet: spans)")
    if len(samples) < 2:
        raise ValueError("packet diagnostics need at least 2 samples (a wrong packet is another sample's)")
    packets, recalls = zip(*[packet_for(sharer, s) for s in samples], strict=True)
    readings = []
    for index, sample in enumerate(samples):
        readings.append(read_packet(receiver, sample, packets[index], "right"))
        readings.append(read_packet(receiver, sample, packets[(index + 1) % len(samples)], "wrong"))
    shares = between_sample_share(packets)
    recalled = [hit for hit in recalls if hit is not None]

    def mean(packet: str, field: str) -> float:
        return statistics.fmean(getattr(r, field) for r in readings if r.packet == packet)

    summary = {
        "n": len(samples),
        "between_sample_share": {"min": min(shares.values()), "mean": statistics.fmean(shares.values())},
        "between_sample_share_per_layer": shares,
        "prefix_attention": {
            "right": mean("right", "prefix_attention"),
            "wrong": mean("wrong", "prefix_attention"),
        },
        "answer_nll": {"right": mean("right", "answer_nll"), "wrong": mean("wrong", "answer_nll")},
        "rows_median": statistics.median(r.rows for r in readings if r.packet == "right"),
        "answer_recall": {
            "share": statistics.fmean(recalled) if recalled else None,
            "counted": len(recalled),
        },
    }
    return {"summary": summary, "readings": [r.__dict__ for r in readings]}
