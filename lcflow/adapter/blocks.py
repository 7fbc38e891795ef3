"""Small building blocks shared by the adapters."""

from __future__ import annotations

import torch
from torch import nn

# Stretch of the hard-concrete gate: sigmoid(logit) is stretched to (-0.1, 1.1) and clipped to
# [0, 1], so a gate can be *exactly* closed (the layer is then pruned) or fully open, and stays
# differentiable in between (Louizos et al., L0 regularisation).
GATE_LOW, GATE_HIGH = -0.1, 1.1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ResidualMLP(nn.Module):
    """x + W2 gelu(W1 norm(x)): the decoder's mixing block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class LayerGate(nn.Module):
    """One learned scalar gate per receiver layer: how much of the translated KV is let in."""

    def __init__(self, init_logit: float = 0.0):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(init_logit)))

    def forward(self) -> torch.Tensor:
        stretched = torch.sigmoid(self.logit) * (GATE_HIGH - GATE_LOW) + GATE_LOW
        return stretched.clamp(0.0, 1.0)

    def is_closed(self, min_gate: float = 0.0) -> bool:
        return self().item() <= min_gate


class KVProjection(nn.Module):
    """Latent [.., b] -> a receiver layer's joint K/V [.., 2*H*D], with a sigmoid weight per head.

    The output projection starts at zero, so an untrained adapter leaves the receiver unchanged.
    """

    def __init__(self, bottleneck: int, hidden: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.mix = ResidualMLP(bottleneck, hidden)
        self.up = nn.Linear(bottleneck, 2 * num_heads * head_dim)
        self.head_weight = nn.Linear(bottleneck, 2 * num_heads)  # one for K and one for V per head
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.mix(h)
        kv = self.up(h).unflatten(-1, (2 * self.num_heads, self.head_dim))
        weights = torch.sigmoid(self.head_weight(h)).unsqueeze(-1)
        return (kv * weights).flatten(-2)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
