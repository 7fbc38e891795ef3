"""Narrowing a trained span packet to b numbers a row, in closed form (the compressed packet).

A full-width span adapter sends, per receiver layer, z = (x - mu_x) E (B numbers a row) and the
receiver rebuilds its keys and values as y = mu_y + z D. Over the rows Z of real packets, those
K/V vary in fewer directions than B; keep the b that matter most. "Most" is measured in a metric
A ([d, d]: an error e in the K/V costs |e A|^2), then the halves are scaled to count alike
(keys carry outlier channels that would otherwise take every direction) while the K/V keep
their overall scale:

    Yc        = (Z - zbar) D A                      the packets' K/V, centred, in the metric
    Yc        = U S V^T,  V_b = V[:, :b]            its b principal directions
    E'        = E D A V_b                           the new encoder: B -> b inside the sharer
    D'        = V_b^T A^-1                          the new decoder: b -> K/V
    mu_y'     = ybar - zbar D A V_b D'              so  mu_y' + z' D' = ybar + (y - ybar) A V_b V_b^T A^-1

i.e. the receiver gets the rank-b least-squares reconstruction (in the metric) of the K/V it got
at full width, and the packet carries z' = (x - mu_x) E' of width b. Two metrics:

    variance   A = I (then the halves' scaling): every K/V number counts alike
    receiver   A = blockdiag(A_k, A_v), the receiver's own sensitivity (receiver_metric):
               keys as its queries see them, values as its output projection sees them

(the code's A includes the halves' weights: A diag(w)).

Task training then refines E', D' by distillation from the full-width adapter
(`lcflow train --teacher-adapter`).
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


def psd_root(matrix: torch.Tensor) -> torch.Tensor:
    """M^1/2 of a symmetric positive semi-definite M, its eigenvalues floored at 1e-6 of the
    largest so that the root can be inverted."""
    eigenvalues, vectors = torch.linalg.eigh(matrix.double())
    root = eigenvalues.clamp_min(float(eigenvalues.max()) * 1e-6).sqrt()
    return vectors @ torch.diag(root) @ vectors.T


def receiver_metric(query_moment: torch.Tensor, out_proj: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[d, d]: A for one receiver layer, so that |e A|^2 is what an error e in a K/V row costs it.

    query_moment: [kv_heads, head_dim, head_dim], C = E[u u^T] over u = R(t - s) q, the receiver's
    queries q (no RoPE) of the heads reading each kv head, turned by RoPE through the distance
    t - s from the query to the packet row it reads (receiver_metrics); out_proj: o_proj's weight
    [hidden, heads * head_dim].

    Keys. The logit of query t on row s is R(t) q . R(s) k = R(t - s) q . k, so an error dk
    moves it by u . dk and costs E[(u . dk)^2] = dk^T C dk: A_k = C^1/2.
    Values. An error dv moves head h's output by a W_o,h dv (a its attention weight); summed over
    the heads that read the kv head (taken as independent), |.|^2 = a^2 dv^T G dv with
    G = sum_h W_o,h^T W_o,h: A_v = G^1/2 (a norm after o_proj, Gemma3's post-attention one, is
    left out). Block-diagonal over kv heads; the two halves are in different units until
    narrow_map counts them alike.
    """
    kv_heads = query_moment.shape[0]
    heads = out_proj.shape[1] // head_dim
    group = heads // kv_heads
    w_o = out_proj.double().reshape(out_proj.shape[0], heads, head_dim)
    width = kv_heads * head_dim
    metric = torch.zeros(2 * width, 2 * width, dtype=torch.float64)
    for g in range(kv_heads):
        keys = slice(g * head_dim, (g + 1) * head_dim)
        values = slice(width + g * head_dim, width + (g + 1) * head_dim)
        metric[keys, keys] = psd_root(query_moment[g])
        w = w_o[:, g * group : (g + 1) * group].reshape(out_proj.shape[0] * group, head_dim)
        metric[values, values] = psd_root(w.T @ w)  # G: sum over the group's heads of W_o,h^T W_o,h
    return metric


def narrow_map(
    rows: torch.Tensor,
    encoder: torch.Tensor,
    decoder: torch.Tensor,
    mu_y: torch.Tensor,
    bottleneck: int,
    balance: bool = True,
    metric: torch.Tensor | None = None,
) -> NarrowedMap:
    """Narrow one layer's map: `rows` [N, B] are real packet rows z of this layer (N >= b);
    `metric` [d, d] is A (receiver_metric), the identity when None. The shares kept are of the
    plain K/V variance, whichever metric chose the directions."""
    if not 0 < bottleneck <= decoder.shape[1]:
        raise ValueError(f"bottleneck must be in 1..{decoder.shape[1]}, not {bottleneck}")
    if len(rows) < bottleneck:
        raise ValueError(f"{len(rows)} packet rows cannot fix {bottleneck} directions: use more samples")
    z, e, d, mu = (t.double() for t in (rows, encoder, decoder, mu_y))
    a = torch.eye(d.shape[1], dtype=torch.float64) if metric is None else metric.double()
    zbar = z.mean(0)
    yc = (z - zbar) @ d
    key_width = d.shape[1] // 2
    a = a * half_weights(yc @ a, key_width, balance)  # A diag(w): the halves counted alike
    _, _, vh = torch.linalg.svd(yc @ a, full_matrices=False)
    v_b = vh[:bottleneck].T  # [d, b]
    new_decoder = v_b.T @ torch.linalg.inv(a)  # V_b^T A^-1
    new_encoder = e @ d @ a @ v_b  # E D A V_b
    ybar = mu + zbar @ d
    new_mu = ybar - (zbar @ d @ a @ v_b) @ new_decoder
    approx = yc @ a @ v_b @ new_decoder
    return NarrowedMap(
        encoder=new_encoder.to(encoder.dtype),
        decoder=new_decoder.to(decoder.dtype),
        mu_y=new_mu.to(mu_y.dtype),
        kept_k=kept_share(yc[:, :key_width], approx[:, :key_width]),
        kept_v=kept_share(yc[:, key_width:], approx[:, key_width:]),
    )
