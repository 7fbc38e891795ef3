"""C2C, the baseline: Cache-to-Cache fusion (Fu et al., ICLR 2026), re-implemented.

One projector per receiver layer t, reading sharer layer s = map[t] ("last_aligned" by
default: the last layers line up, s = max(0, t - (R_layers - S_layers))). Keys and values take
separate, identical paths. For keys, per token, with S = H_s*D_s, R = H_r*D_r, H = H_r:

    h     = W_in [K_s ; K_r]                          (S + R -> R, bias; both flattened over heads)
    h     = ffn(h)                                    shared block
    K_p   = W_out ffn_p(h)                            projection branch, R -> R, reshaped to H x D_r
    w     = W_w ffn_w(h)                              per-head weight branch, R -> H
    K_out = K_r + g_K * sigmoid(w) * K_p              (sigmoid(w) broadcast over each head's D_r)

    ffn(x) = x + dropout(W2 gelu(W1 rmsnorm(x)))       R -> R -> R, bias-free, residual

The gate g_K comes from one scalar logit per projector (and g_V from another):
    training:   g = sigmoid((logit + G) / tau),  G ~ Gumbel(0, 1), one draw per (batch, head, token)
    inference:  g = [logit > 0]
tau is annealed exponentially from 1.0 to 0.001 (`anneal`), as in C2C. The logits start at 0,
so an untrained fuser is closed at inference: it leaves the receiver's cache untouched.

Keys are fused as stored, i.e. *with* RoPE, as C2C does: this works only when sharer and
receiver keys carry the same positions. C2C runs both models over the same tokens; here
the sharer's de-rotated keys are aligned to the receiver's tokens by character spans
(lcflow.core.tokens) and re-rotated with the sharer's own RoPE at the receiver's positions
(`aligned_sharer_kv`), so the fuser sees what the sharer would have stored had it read the
receiver's tokens at the receiver's positions.

Parameters per projector (one path, times 2), matching the released C2C fuser:
    W_in        (S + R) R + R
    3 ffn       3 (R + 2 R^2)          RMSNorm weight + two bias-free R x R matrices
    W_out       R^2 + R
    W_w         R H + H
    gate        1
    path        = S R + 8 R^2 + 5 R + R H + H + 1
Paper pair (sharer Qwen2.5-0.5B: S = 2 x 64 = 128; receiver Qwen3-0.6B: R = 8 x 128 = 1024,
H = 8, 28 layers): path = 131,072 + 8,388,608 + 5,120 + 8,192 + 8 + 1 = 8,533,001,
projector = 17,066,002, fuser = 28 x 17,066,002 = 477,848,056 (955.7 MB in bf16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import DynamicCache

from lcflow.adapter.blocks import RMSNorm, parameter_count
from lcflow.adapter.config import FUSER_FILE, AdapterConfig
from lcflow.core.kv import CapturedKV, ModelIdentity, StoredRope, split_joint
from lcflow.core.layer_map import build_layer_map
from lcflow.core.tokens import SpanAlignment

C2C_DROPOUT = 0.1  # inside every ffn block, training only
TEMPERATURE_START, TEMPERATURE_END = 1.0, 0.001
ANNEAL_STEPS = 1929  # C2C anneals over its whole run (1929 steps)
GUMBEL_EPS = 1e-20
WIRE_BYTES_PER_VALUE = 2  # the sharer's KV would travel as bfloat16


class FFNBlock(nn.Module):
    """x + dropout(W2 gelu(W1 rmsnorm(x))): C2C's pre-norm, bias-free residual block."""

    def __init__(self, dim: int, dropout: float = C2C_DROPOUT):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.fc2(nn.functional.gelu(self.fc1(self.norm(x)))))


def gumbel_noise(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """G = -log(-log(u)), u ~ U(0, 1): one Gumbel(0, 1) draw per element (C2C's sampler)."""
    u = torch.rand(shape, device=like.device, dtype=like.dtype)
    return -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)


class FusionPath(nn.Module):
    """The key path or the value path of one projector (see the module docstring)."""

    def __init__(self, sharer_width: int, num_heads: int, head_dim: int, dropout: float = C2C_DROPOUT):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        width = num_heads * head_dim  # C2C's hidden size is the receiver's width (1024 for the paper pair)
        self.fuse_in = nn.Linear(sharer_width + width, width)
        self.shared = FFNBlock(width, dropout)
        self.proj_ffn = FFNBlock(width, dropout)
        self.proj_out = nn.Linear(width, width)
        self.weight_ffn = FFNBlock(width, dropout)
        self.weight_out = nn.Linear(width, num_heads)
        self.gate_logit = nn.Parameter(torch.tensor(0.0))

    def is_open(self) -> bool:
        """The inference gate, [logit > 0]."""
        return bool(self.gate_logit.item() > 0)

    def gate(self, shape: tuple[int, ...], temperature: float, like: torch.Tensor) -> torch.Tensor:
        """Gumbel-sigmoid in training (shape [batch, heads, tokens, 1]), the hard gate otherwise."""
        if self.training:
            return torch.sigmoid((self.gate_logit + gumbel_noise(shape, like)) / temperature)
        return (self.gate_logit > 0).to(like.dtype)

    def forward(
        self, sharer: torch.Tensor, receiver: torch.Tensor, covered: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """sharer [B, H_s, N, D_s], receiver [B, H, N, D] (as stored), covered [N] -> fused [B, H, N, D]."""
        if not self.training and not self.is_open():
            return receiver  # a closed hard gate adds nothing: the receiver stays bit-identical
        batch, _, tokens, _ = receiver.shape
        dtype = self.fuse_in.weight.dtype
        flat = [x.transpose(1, 2).reshape(batch, tokens, -1).to(dtype) for x in (sharer, receiver)]
        h = self.shared(self.fuse_in(torch.cat(flat, dim=-1)))
        projected = self.proj_out(self.proj_ffn(h)).view(batch, tokens, self.num_heads, self.head_dim)
        weight = torch.sigmoid(self.weight_out(self.weight_ffn(h))).unsqueeze(-1)  # [B, N, H, 1]
        delta = (weight * projected).transpose(1, 2)  # [B, H, N, D]
        delta = delta * self.gate((batch, self.num_heads, tokens, 1), temperature, delta)
        delta = delta * covered.to(delta.dtype)[None, None, :, None]  # uncovered tokens stay as they are
        return receiver + delta.to(receiver.dtype)


class C2CProjector(nn.Module):
    """One receiver layer's fuser: a key path and a value path."""

    def __init__(self, sharer_width: int, num_heads: int, head_dim: int, dropout: float = C2C_DROPOUT):
        super().__init__()
        self.key = FusionPath(sharer_width, num_heads, head_dim, dropout)
        self.value = FusionPath(sharer_width, num_heads, head_dim, dropout)

    def is_open(self) -> bool:
        return self.key.is_open() or self.value.is_open()


class C2CFuser(nn.Module):
    """The C2C baseline adapter: one projector per retained receiver layer, fused into its cache."""

    def __init__(self, config: AdapterConfig, dropout: float = C2C_DROPOUT):
        super().__init__()
        if config.mode != "c2c":
            raise ValueError(f"C2CFuser needs an adapter config of mode 'c2c', not {config.mode!r}")
        self.config = config
        self.layer_map = dict(config.layer_map)
        self.layers = list(config.retained_layers)
        sharer, receiver = config.sharer.spec, config.receiver.spec
        sharer_width = sharer.num_kv_heads * sharer.head_dim
        self.projectors = nn.ModuleDict(
            {
                str(t): C2CProjector(sharer_width, receiver.num_kv_heads, receiver.head_dim, dropout)
                for t in self.layers
            }
        )
        self.temperature = TEMPERATURE_START
        self._sharer_rope: StoredRope | None = None  # sharer_rope(), once read

    @classmethod
    def for_models(
        cls,
        sharer: ModelIdentity,
        receiver: ModelIdentity,
        layer_map_strategy: str = "last_aligned",
        dropout: float = C2C_DROPOUT,
        **options,
    ) -> C2CFuser:
        """A fresh (untrained) fuser for a sharer/receiver pair."""
        layer_map = build_layer_map(sharer.spec.num_layers, receiver.spec.num_layers, layer_map_strategy)
        config = AdapterConfig(
            mode="c2c",
            sharer=sharer,
            receiver=receiver,
            layer_map=layer_map,
            retained_layers=sorted(layer_map),
            layer_map_strategy=layer_map_strategy,
            **options,
        )
        return cls(config, dropout=dropout)

    # --- gate temperature (training) ---------------------------------------------------------

    def set_temperature(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"the gate temperature must be positive, not {temperature}")
        self.temperature = float(temperature)

    def anneal(self, step: int, anneal_steps: int = ANNEAL_STEPS) -> float:
        """tau = tau_0 (tau_1 / tau_0)^min(step / anneal_steps, 1): C2C's exponential schedule."""
        ratio = min(max(step, 0) / anneal_steps, 1.0)
        self.set_temperature(TEMPERATURE_START * (TEMPERATURE_END / TEMPERATURE_START) ** ratio)
        return self.temperature

    # --- fusion ------------------------------------------------------------------------------

    def fuse_layer(
        self,
        cache: DynamicCache,
        layer: int,
        sharer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        covered: torch.Tensor,
    ) -> None:
        """Fuse one receiver layer's cache at `positions` [tokens] (absolute, ascending, contiguous).

        sharer_kv: {sharer layer: (keys *with RoPE* at those receiver positions, values)}, each
        [batch, H_s, tokens, D_s] (see `aligned_sharer_kv`); covered: [tokens] bool.
        """
        projector = self.projectors[str(layer)]
        if not self.training and not projector.is_open():
            return  # both hard gates closed: nothing to compute, nothing changes
        entry = cache.layers[layer]
        keys, values = entry.keys, entry.values
        # A sliding-window layer may have dropped its oldest tokens: index relative to what is kept.
        offset = entry.get_seq_length() - keys.shape[-2]
        keep = positions >= offset
        if not bool(keep.any()):
            return
        source = self.layer_map[layer]
        sharer_k, sharer_v = (x[:, :, keep] for x in sharer_kv[source])
        positions, covered = positions[keep], covered[keep]
        start, end = int(positions[0]) - offset, int(positions[-1]) - offset + 1
        fused_k = projector.key(sharer_k, keys[:, :, start:end], covered, self.temperature)
        fused_v = projector.value(sharer_v, values[:, :, start:end], covered, self.temperature)
        entry.keys = torch.cat([keys[:, :, :start], fused_k, keys[:, :, end:]], dim=2)
        entry.values = torch.cat([values[:, :, :start], fused_v, values[:, :, end:]], dim=2)

    def fuse(
        self,
        cache: DynamicCache,
        sharer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        covered: torch.Tensor,
    ) -> DynamicCache:
        """Fuse every retained layer into `cache` (in place; returned for convenience)."""
        for layer in self.layers:
            self.fuse_layer(cache, layer, sharer_kv, positions, covered)
        return cache

    # --- the sharer's side, as the receiver has it ------------------------------------------

    def sharer_kv(self, joint: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The payload of a C2C packet ({sharer layer: keys and values side by side per token,
        [1, tokens, 2 H_s D_s], as `C2CSender` sends them}) as {sharer layer: (keys, values)}."""
        spec = self.config.sharer.spec
        return {s: split_joint(z, spec.num_kv_heads, spec.head_dim) for s, z in joint.items()}

    def sharer_rope(self) -> StoredRope:
        """The sharer's RoPE as recorded in the config (a receiver service has no sharer model);
        read and checked once, then kept: every served handoff re-rotates with it."""
        if self._sharer_rope is None:
            self._sharer_rope = stored_sharer_rope(self.config)
        return self._sharer_rope

    # --- sizes and gates ---------------------------------------------------------------------

    def parameter_count(self) -> int:
        return parameter_count(self)

    def parameter_counts(self) -> dict[str, int]:
        """Total and per projector (all projectors have the same size)."""
        per_layer = parameter_count(next(iter(self.projectors.values()))) if self.layers else 0
        total = self.parameter_count()
        return {"fuser": total, "per_layer": per_layer, "total": total}

    def gate_logits(self) -> dict[int, dict[str, float]]:
        """Key and value gate logits per retained receiver layer (open at inference when > 0)."""
        return {
            t: {"key": p.key.gate_logit.item(), "value": p.value.gate_logit.item()}
            for t, p in ((t, self.projectors[str(t)]) for t in self.layers)
        }

    # --- files -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """adapter_config.json (mode "c2c") + fuser.safetensors, weights in `dtype`."""
        return self.config.save_with_weights(
            directory, dtype or getattr(torch, self.config.dtype), {FUSER_FILE: self}
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        sharer: ModelIdentity | None = None,
        receiver: ModelIdentity | None = None,
        device: torch.device | str = "cpu",
    ) -> C2CFuser:
        """Load a C2C adapter directory, frozen, in eval mode; refuse models it was not trained for."""
        config = AdapterConfig.load(directory)
        if config.mode != "c2c":
            raise ValueError(
                f"{directory} holds a {config.mode!r} adapter; load it with lcflow.adapter.LatentAdapter"
            )
        config.check_models(sharer=sharer, receiver=receiver)
        path = Path(directory, FUSER_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the adapter directory is incomplete")
        fuser = cls(config)
        fuser.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
        fuser.requires_grad_(False)
        return fuser.to(device).eval()


# --- the sharer's KV, as the fuser wants it ------------------------------------------------------


class C2CSender:
    """The sharer's half of a C2C adapter: no weights, only which KV to send.

    A C2C packet holds, per sharer layer the fuser reads, that layer's keys (RoPE removed) and
    values side by side per sharer token, [1, T, 2 H_s D_s] (`CapturedKV.joint`), and the
    tokens' character spans: the sharer's own cache, not a learned latent."""

    def __init__(self, config: AdapterConfig):
        if config.mode != "c2c":
            raise ValueError(f"C2CSender needs an adapter config of mode 'c2c', not {config.mode!r}")
        self.config = config
        self.layers = config.packet_layers()

    def encode_layers(self, captured: CapturedKV):
        """Yield (sharer layer, [1, T, 2 H_s D_s]) for each layer the fuser reads."""
        for layer in self.layers:
            yield layer, captured.joint(layer)


def stored_sharer_rope(config: AdapterConfig) -> StoredRope:
    """A C2C config's recorded sharer RoPE, checked against the sharer's shape; ValueError saying
    what is wrong and how to fix it (the services list such an adapter unusable with this text)."""
    if not config.sharer_rope:
        raise ValueError(
            "this C2C adapter has no sharer_rope in its config (it predates served C2C); "
            "re-save it with lcflow.adapter.c2c.record_sharer_rope and the sharer model"
        )
    try:
        return StoredRope.from_dict(config.sharer_rope, config.sharer.spec)
    except ValueError as err:
        raise ValueError(f"its sharer_rope cannot be used: {err}") from None


def record_sharer_rope(config: AdapterConfig, sharer_model) -> AdapterConfig:
    """Store the sharer's RoPE in a C2C config (done at training; once for older adapters)."""
    config.sharer_rope = StoredRope.of_model(sharer_model).to_dict()
    return config


def aligned_sharer_kv(
    rope, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], alignment: SpanAlignment, positions: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The sharer's KV moved onto the receiver's tokens, keys re-rotated at the receiver's positions.

    kv: {sharer layer: (keys without RoPE, values)}, [B, H_s, sharer tokens, D_s]; each receiver
    token gets the mean of the sharer tokens overlapping it, and the keys get the sharer's own RoPE
    (`rope`: a RopeCodec of the sharer model, or its StoredRope) at `positions` [tokens]: what the
    sharer would have stored for those tokens at those positions.
    """
    aligned = {}
    for layer, (k, v) in kv.items():
        k, v = alignment.apply(k), alignment.apply(v)  # [B, H_s, receiver tokens, D_s]
        pos = positions.to(k.device).unsqueeze(0).expand(k.shape[0], -1)
        aligned[layer] = (rope.rotate(k, pos, layer), v)
    return aligned
