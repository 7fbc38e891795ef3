"""Dense alignment: a closed-form map from the sharer's KV to the receiver's KV of the same text.

For every receiver layer t, pairs (x, y) are collected over many documents: x the sharer's
keys and values (RoPE removed, joined per token; optionally several sharer layers side by
side) for one sharer token, y the receiver's own keys and values of the same characters (the
mean over the receiver tokens that overlap the sharer token's span, via lcflow.core.tokens). No
backward pass through either model is needed: only sufficient statistics are kept.

The map goes through a bottleneck of width b (reduced-rank ridge regression):

    B      = (S_xx + lambda I)^-1 S_xy                  ridge fit, centred
    C      = W B^T S_xx B W                             fitted covariance, K and V blocks
                                                        weighted to equal total variance (W)
    U      = top-b eigenvectors of C
    encode:  z = (x - mu_x) B W U                       [b] per token: what travels
    decode:  y = mu_y + z U^T W^-1                      the receiver's K and V for layer t

R^2 per layer (keys and values separately) is measured on held-out documents.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lcflow.core.kv import CapturedKV, capture_kv, full_cache, kv_spec, prefill
from lcflow.core.prompting import tokenize_context
from lcflow.core.tokens import align_spans
from lcflow.packets.placement import own_document_kv, slot_layout

ALIGNMENT_CONFIG = "alignment_config.json"
ALIGNMENT_WEIGHTS = "alignment.safetensors"


@dataclass
class AlignmentConfig:
    layer_map: dict[int, int]  # receiver layer -> central sharer layer
    window: int = 0  # sharer layers centre-window .. centre+window feed each receiver layer
    bottleneck: int = 128
    ridge: float = 1e-3  # lambda, relative to the mean variance of x
    sharer_layers: int = 0  # how many layers the sharer has (clips the window)
    documents: int = 0  # how many documents the fit saw
    r2: dict = field(default_factory=dict)  # held-out fit per receiver layer: {"k": .., "v": ..}

    def inputs_for(self, layer: int) -> list[int]:
        centre = self.layer_map[layer]
        lo, hi = max(0, centre - self.window), min(self.sharer_layers - 1, centre + self.window)
        return list(range(lo, hi + 1))


def sharer_features(captured: CapturedKV, layers: list[int]) -> torch.Tensor:
    """[tokens, sum of kv_dim]: the sharer's joint K/V of `layers` for each token."""
    return torch.cat([captured.joint(s)[0] for s in layers], dim=-1)


class _Moments:
    """Running first and second moments of (x, y) pairs, in float64."""

    def __init__(self, dx: int, dy: int):
        self.n = 0
        self.sx, self.sy = torch.zeros(dx, dtype=torch.float64), torch.zeros(dy, dtype=torch.float64)
        self.xx = torch.zeros(dx, dx, dtype=torch.float64)
        self.xy = torch.zeros(dx, dy, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # One document's products in float32 (fast), summed across documents in float64.
        x, y = x.float(), y.float()
        self.n += x.shape[0]
        self.sx += x.sum(0).double()
        self.sy += y.sum(0).double()
        self.xx += (x.T @ x).double()
        self.xy += (x.T @ y).double()


@dataclass
class LayerMap:
    """The fitted map for one receiver layer."""

    mu_x: torch.Tensor  # [dx]
    mu_y: torch.Tensor  # [dy]
    encoder: torch.Tensor  # [dx, b]
    decoder: torch.Tensor  # [b, dy]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu_x.to(x.dtype)) @ self.encoder.to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.mu_y.to(z.dtype) + z @ self.decoder.to(z.dtype)


def ridge_beta(sxx: torch.Tensor, sxy: torch.Tensor, ridge: float) -> torch.Tensor:
    """B = (Sxx + lam I)^-1 Sxy from centred moments, lam = ridge * mean(diag Sxx)."""
    lam = ridge * sxx.diagonal().mean()
    return torch.linalg.solve(sxx + lam * torch.eye(sxx.shape[0], dtype=sxx.dtype), sxy)


def fit_layer(moments: _Moments, bottleneck: int, ridge: float, key_dim: int) -> LayerMap:
    """Reduced-rank ridge regression from the moments (see the module docstring)."""
    n = moments.n
    mu_x, mu_y = moments.sx / n, moments.sy / n
    sxx = moments.xx / n - torch.outer(mu_x, mu_x)
    sxy = moments.xy / n - torch.outer(mu_x, mu_y)
    beta = ridge_beta(sxx, sxy, ridge)
    fitted = beta.T @ sxx @ beta  # covariance of the predictions
    var = fitted.diagonal().clamp(min=1e-12)
    weight = torch.ones_like(var)
    for block in (slice(0, key_dim), slice(key_dim, None)):
        weight[block] = var[block].sum().rsqrt()
    c = weight[:, None] * fitted * weight[None, :]
    _, vectors = torch.linalg.eigh(c)
    u = vectors[:, -bottleneck:].flip(-1)  # top-b, largest first
    encoder = beta * weight[None, :] @ u
    decoder = u.T / weight[None, :]
    return LayerMap(mu_x.float(), mu_y.float(), encoder.float(), decoder.float())


class KVAlignment:
    """Per receiver layer, a closed-form map sharer K/V -> bottleneck -> receiver K/V."""

    def __init__(self, config: AlignmentConfig, maps: dict[int, LayerMap]):
        self.config, self.maps = config, maps

    @property
    def layers(self) -> list[int]:
        return sorted(self.maps)

    def encode(self, captured: CapturedKV, layer: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [1, tokens, b] for receiver layer `layer` (of the given sharer positions)."""
        x = sharer_features(captured, self.config.inputs_for(layer))
        if positions is not None:
            x = x[positions]
        return self.maps[layer].encode(x)[None]

    def decode(self, z: torch.Tensor, layer: int, heads: int, head_dim: int):
        """Latents [1, tokens, b] -> keys (no RoPE), values [1, heads, tokens, head_dim]."""
        y = self.maps[layer].decode(z)
        k, v = y.split(heads * head_dim, dim=-1)
        shape = (y.shape[0], y.shape[1], heads, head_dim)
        return k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for t, m in self.maps.items():
            for name in ("mu_x", "mu_y", "encoder", "decoder"):
                tensors[f"{t}.{name}"] = getattr(m, name).contiguous()
        save_file(tensors, str(directory / ALIGNMENT_WEIGHTS))
        data = asdict(self.config)
        data["layer_map"] = {str(k): v for k, v in self.config.layer_map.items()}
        (directory / ALIGNMENT_CONFIG).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> KVAlignment:
        directory = Path(directory)
        data = json.loads((directory / ALIGNMENT_CONFIG).read_text())
        data["layer_map"] = {int(k): v for k, v in data["layer_map"].items()}
        data["r2"] = {int(k): v for k, v in data.get("r2", {}).items()}
        config = AlignmentConfig(**data)
        tensors = load_file(str(directory / ALIGNMENT_WEIGHTS))
        maps = {
            t: LayerMap(*(tensors[f"{t}.{name}"] for name in ("mu_x", "mu_y", "encoder", "decoder")))
            for t in config.layer_map
        }
        return cls(config, maps)


def identity_alignment(spec, documents: int = 0) -> KVAlignment:
    """The exact map for one model on both sides (same tokenizer, no chat template between them):
    every layer to itself at full width, b = the K/V width. No compression per token; the
    packet still keeps at most m tokens."""
    d = spec.kv_dim
    config = AlignmentConfig(
        layer_map={t: t for t in range(spec.num_layers)},
        bottleneck=d,
        ridge=0.0,
        sharer_layers=spec.num_layers,
        documents=documents,
    )
    eye = torch.eye(d)
    maps = {t: LayerMap(torch.zeros(d), torch.zeros(d), eye.clone(), eye.clone()) for t in config.layer_map}
    return KVAlignment(config, maps)


@torch.no_grad()
def paired_kv(sharer, receiver, document: str):
    """One document through both models: the sharer's captured KV and, per sharer token, the
    receiver's KV of the same characters ([sharer tokens, dy] per receiver layer), plus the
    mask of sharer tokens that have a receiver counterpart."""
    s_model, s_tok = sharer
    r_model, r_tok = receiver
    ids, s_spans = tokenize_context(s_tok, document)
    s_captured = capture_kv(s_model, prefill(s_model, ids, full_cache()))
    layout = slot_layout(r_tok, "")
    r_captured, r_spans = own_document_kv(r_model, r_tok, document, layout)
    # Sharer tokens are the rows: the packet carries one entry per selected sharer token.
    alignment = align_spans(r_spans, s_spans)
    targets = [alignment.apply(r_captured.joint(t)[0]) for t in range(len(r_captured.keys))]
    return s_captured, targets, alignment.covered


@dataclass
class AlignmentStats:
    """Moments of (sharer features, receiver K/V) per receiver layer, for the widest window;
    a narrower window's fit uses a sub-block of the same moments."""

    config: AlignmentConfig  # its window is the widest collected
    moments: dict[int, _Moments]
    sharer_kv_dim: int
    receiver_key_dim: int

    def narrowed(self, layer: int, window: int) -> _Moments:
        wide = self.config.inputs_for(layer)
        centre = self.config.layer_map[layer]
        keep = [i for i, s in enumerate(wide) if abs(s - centre) <= window]
        index = torch.cat([torch.arange(i * self.sharer_kv_dim, (i + 1) * self.sharer_kv_dim) for i in keep])
        full = self.moments[layer]
        out = _Moments(len(index), full.sy.numel())
        out.n, out.sx, out.sy = full.n, full.sx[index], full.sy
        out.xx, out.xy = full.xx[index][:, index], full.xy[index]
        return out


@torch.no_grad()
def collect_stats(
    sharer, receiver, documents: list[str], layer_map: dict[int, int], window: int = 0, progress: bool = True
) -> AlignmentStats:
    """One pass over `documents` through both models, keeping only moments."""
    s_spec, r_spec = kv_spec(sharer[0].config), kv_spec(receiver[0].config)
    config = AlignmentConfig(
        layer_map=dict(layer_map), window=window, sharer_layers=s_spec.num_layers, documents=len(documents)
    )
    moments: dict[int, _Moments] = {}
    for document in tqdm(documents, desc="align", unit="doc", disable=not progress):
        s_captured, targets, covered = paired_kv(sharer, receiver, document)
        for t in layer_map:
            x = sharer_features(s_captured, config.inputs_for(t))[covered]
            y = targets[t][covered]
            if t not in moments:
                moments[t] = _Moments(x.shape[1], y.shape[1])
            moments[t].add(x, y)
    return AlignmentStats(config, moments, s_spec.kv_dim, r_spec.num_kv_heads * r_spec.head_dim)


def fit_alignment(
    stats: AlignmentStats, window: int | None = None, bottleneck: int = 128, ridge: float = 1e-3
) -> KVAlignment:
    """The reduced-rank ridge map for every receiver layer, from `stats` (window <= the collected one)."""
    window = stats.config.window if window is None else window
    if window > stats.config.window:
        raise ValueError(f"window {window} is wider than the collected {stats.config.window}")
    config = AlignmentConfig(
        layer_map=dict(stats.config.layer_map),
        window=window,
        bottleneck=min(bottleneck, 2 * stats.receiver_key_dim),
        ridge=ridge,
        sharer_layers=stats.config.sharer_layers,
        documents=stats.config.documents,
    )
    maps = {
        t: fit_layer(stats.narrowed(t, window), config.bottleneck, ridge, stats.receiver_key_dim)
        for t in stats.moments
    }
    return KVAlignment(config, maps)


@torch.no_grad()
def held_out_r2(alignment: KVAlignment, sharer, receiver, documents: list[str]) -> dict:
    """1 - SSE/SST of the decoded keys and values against the receiver's own, per layer."""
    r_spec = kv_spec(receiver[0].config)
    key_dim = r_spec.num_kv_heads * r_spec.head_dim
    sse: dict[int, torch.Tensor] = {}
    ys: dict[int, list[torch.Tensor]] = {}
    for document in documents:
        s_captured, targets, covered = paired_kv(sharer, receiver, document)
        for t, m in alignment.maps.items():
            x = sharer_features(s_captured, alignment.config.inputs_for(t))[covered]
            y = targets[t][covered]
            err = (m.decode(m.encode(x)) - y).double().pow(2)
            sse[t] = sse.get(t, 0) + torch.stack([err[:, :key_dim].sum(), err[:, key_dim:].sum()])
            ys.setdefault(t, []).append(y.double())
    r2 = {}
    for t in alignment.maps:
        y = torch.cat(ys[t])
        centred = (y - y.mean(0)).pow(2)
        sst = torch.stack([centred[:, :key_dim].sum(), centred[:, key_dim:].sum()])
        k, v = (1 - sse[t] / sst).tolist()
        r2[t] = {"k": round(k, 4), "v": round(v, 4)}
    return r2


def mean_r2(r2: dict) -> float:
    """The mean over receiver layers of the held-out R^2 of keys and values (KVAlignment.config.r2)."""
    return sum((v["k"] + v["v"]) / 2 for v in r2.values()) / len(r2)
