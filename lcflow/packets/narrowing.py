"""Narrowing a trained span packet to b numbers a row, in closed form (the compressed packet).

A full-width span adapter sends, per receiver layer, z = (x - mu_x) E (B numbers a row) and the
receiver rebuilds its keys and values as y = mu_y + z D. Over the rows Z of real packets, those
K/V vary in fewer directions than B; keep the b that carry most of it. With W a diagonal weight
that makes the keys' and the values' variance count alike (keys carry outlier channels that
would otherwise take every direction) while keeping the K/V's overall scale:

    Yc        = (Z - zbar) D W                      the packets' K/V, centred and weighted
    Yc        = U S V^T,  V_b = V[:, :b]            its b principal directions
    E'        = E D W V_b                           the new encoder: B -> b inside the sharer
    D'        = V_b^T W^-1                          the new decoder: b -> K/V
    mu_y'     = ybar - zbar D W V_b D'              so  mu_y' + z' D' = ybar + (y - ybar) W V_b V_b^T W^-1

i.e. the receiver gets the rank-b least-squares (weighted) reconstruction of the K/V it got at
full width, and the packet carries z' = (x - mu_x) E' of width b. Task training then refines
E', D' by distillation from the full-width adapter (`lcflow train --teacher-adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NarrowedMap:
    """One receiver layer's narrowed halves, and how much of the packet's K/V they keep."""

    encoder: torch.Tensor  # [in, b]: replaces E
    decoder: torch.Tensor  # [b, d]: replaces D
    mu_y: torch.Tensor  # [d]
    kept_k: float  # share of the keys' variance over the rows that the b directions keep
    kept_v: float  # the same for the values


def half_weights(yc: torch.Tensor, key_width: int, balance: bool) -> torch.Tensor:
    """[d]: per half (keys, values), sqrt(mean variance / the half's mean variance), or ones
    without `balance`. The halves then count alike and the weighted K/V keep their overall scale,
    so the narrowed encoder's weights are of the teacher's size (an optimizer's steps stay small
    against them when distillation refines them)."""
    if not balance:
        return torch.ones(yc.shape[1], dtype=yc.dtype)
    variance = yc.pow(2).mean(0)
    overall, k_var, v_var = variance.mean(), variance[:key_width].mean(), variance[key_width:].mean()
    w = torch.empty(yc.shape[1], dtype=yc.dtype)
    w[:key_width] = (overall / k_var.clamp_min(1e-12)).sqrt()
    w[key_width:] = (overall / v_var.clamp_min(1e-12)).sqrt()
    return w


def kept_share(yc: torch.Tensor, approx: torch.Tensor) -> float:
    """1 - |Yc - approx|^2 / |Yc|^2."""
    return float(1 - (yc - approx).pow(2).sum() / yc.pow(2).sum().clamp_min(1e-12))


def narrow_map(
    rows: torch.Tensor,
    encoder: torch.Tensor,
    decoder: torch.Tensor,
    mu_y: torch.Tensor,
    bottleneck: int,
    balance: bool = True,
) -> NarrowedMap:
    """Narrow one layer's map: `rows` [N, B] are real packet rows z of this layer (N >= b)."""
    if not 0 < bottleneck <= decoder.shape[1]:
        raise ValueError(f"bottleneck must be in 1..{decoder.shape[1]}, not {bottleneck}")
    if len(rows) < bottleneck:
        raise ValueError(f"{len(rows)} packet rows cannot fix {bottleneck} directions: use more samples")
    z, e, d, mu = (t.double() for t in (rows, encoder, decoder, mu_y))
    zbar = z.mean(0)
    yc = (z - zbar) @ d
    key_width = d.shape[1] // 2
    w = half_weights(yc, key_width, balance)
    _, _, vh = torch.linalg.svd(yc * w, full_matrices=False)
    v_b = vh[:bottleneck].T  # [d, b]
    new_decoder = v_b.T / w  # V_b^T W^-1
    new_encoder = e @ d @ (w[:, None] * v_b)  # E D W V_b
    ybar = mu + zbar @ d
    new_mu = ybar - (zbar @ d @ (w[:, None] * v_b)) @ new_decoder
    approx = (yc * w) @ v_b @ new_decoder
    return NarrowedMap(
        encoder=new_encoder.to(encoder.dtype),
        decoder=new_decoder.to(decoder.dtype),
        mu_y=new_mu.to(mu_y.dtype),
        kept_k=kept_share(yc[:, :key_width], approx[:, :key_width]),
        kept_v=kept_share(yc[:, key_width:], approx[:, key_width:]),
    )
