"""Quantized latents on the wire (format version 2): int8 and int4 codes with absmax scales.

A float tensor x whose last dimension has n elements is cut, along that dimension, into
groups of g elements (int8: g = n, one scale per row; int4: g = min(group_size, n), which
must divide n). For each group:

    s = max(absmax(group) / Q, tiny)      Q = 127 (int8) or 7 (int4); tiny = the scale dtype's
                                          smallest normal number, so that s is never 0
    s is stored in the scale dtype (float16 by default: round to nearest, relative error
    e <= 2^-11; bfloat16: e <= 2^-9)
    q = clamp(round(x / s), -Q, Q)        int8: one signed byte each; int4: q + 8 in 1..15,
                                          two per byte, the even element in the low nibble
    x^ = q * s                            on the receiver, then cast to the declared dtype

Rotated groups ("int4-hadamard", format version 3): each group is multiplied by the orthonormal
Walsh-Hadamard matrix H_g (g a power of two; H_g H_g = I) before the steps above, and the
receiver multiplies each dequantized group by H_g again: x^ = H_g (q * s). One outlier channel
then no longer sets its group's scale alone: its energy is spread over all g coordinates, and
the other channels keep their resolution (the idea of QuaRot / QuIP#'s incoherence processing).
Bytes are exactly int4's; the cost is a g x g matrix product per group at each end.

Error bound, per element: |x - x^| <= s / 2 (s as stored); with rotated groups it holds for H_g
x per element, hence in norm for each group of x: ||x - x^|| <= s sqrt(g) / 2. Rounding to
nearest is off by at most half a step, and clamping never bites: |x| / s <= Q (1 + e) < Q + 1/2
for both scale dtypes. The receiver's cast to the declared dtype adds half an ulp of that dtype
(bfloat16: 2^-9 |x^|). tests/unit/test_quantized_codec.py asserts exactly this bound.

Wire layout: the blob of a segment holds, in place of each float tensor NAME, its codes as
NAME (int8 [..., n] or uint8 [..., n/2]) and its scales as NAME.scales ([..., n/g] in the
scale dtype); int32 tensors (token spans) travel as they are. The header keeps declaring
NAME with the dtype and shape the receiver gets back, and declares the scales beside it
(TensorSpec.scales), so the receiver checks every size before it allocates anything.

Bytes per element, scales included, with float16 scales: int8 1 + 2/n, int4 1/2 + 2/g.

The int4 group size (DEFAULT_INT4_GROUP = 64): an extra bit per element buys much more error
reduction spent on code width (int4 -> int8) than on smaller groups, and each halving of g buys
less than the one before. The rule "halve g while it buys at least half of what a code bit does"
stops at 64 or 32 on the shipped adapters' latents, and 64 takes the byte side of that tie; g = 32
(CodecConfig.group_size) is the cheaper step to try before int8 where int4 costs answers. The
measurements: docs/results/transport-design.md; each codec's accuracy: docs/results/codecs/.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from lcflow.core.names import DEFAULT_INT4_GROUP, GROUP_SIZES, GROUP_SUFFIX, QUANTIZATIONS, split_group
from lcflow.transport.segments import DTYPES, TensorSpec

QMAX = {"int8": 127, "int4": 7}
ROTATIONS = ("none", "hadamard")
ROTATED_SUFFIX = "-hadamard"  # "int4-hadamard": int4 with each group rotated first
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
SCALES_SUFFIX = ".scales"
INT4_OFFSET = 8  # int4 codes -7..7 travel as 1..15: an unsigned nibble


@dataclass(frozen=True)
class Quantization:
    """How float tensors become codes and scales; the same object checks a received header."""

    scheme: str = "none"  # "none", "int8" or "int4" (QMAX)
    group_size: int = 0  # elements per scale along the last dimension; 0 = the whole row
    scale_dtype: str = "float16"  # one of SCALE_DTYPES
    rotation: str = "none"  # "hadamard": each group is multiplied by H_g before it is quantized

    def __post_init__(self) -> None:
        if self.scheme != "none" and self.scheme not in QMAX:
            raise ValueError(
                f"unknown quantization scheme {self.scheme!r}: use none, {' or '.join(QMAX)} "
                f"(a rotated int4 is scheme int4 with rotation hadamard)"
            )
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}: use one of {ROTATIONS}")
        if self.rotation != "none" and self.scheme == "none":
            raise ValueError("a rotation is only for quantized tensors")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale dtype {self.scale_dtype!r} is not one of {SCALE_DTYPES}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be 0 (whole rows) or positive, not {self.group_size}")

    @classmethod
    def named(cls, name: str, group_size: int | None = None, scale_dtype: str = "float16") -> Quantization:
        """A named quantization (QUANTIZATIONS: "int4-hadamard" is int4 with rotated groups) with
        the group the name gives ("int4-hadamard-g32": names.split_group), else `group_size`, else
        its measured default group: int8 whole rows, int4 DEFAULT_INT4_GROUP."""
        name, named_group = split_group(name)
        if name not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {name!r}: use one of {QUANTIZATIONS}")
        if named_group is not None:
            if group_size is not None and group_size != named_group:
                raise ValueError(
                    f"{name}{GROUP_SUFFIX}{named_group} names group {named_group}, not {group_size}"
                )
            group_size = named_group
        rotated = name.endswith(ROTATED_SUFFIX)
        scheme = name.removesuffix(ROTATED_SUFFIX)
        if group_size is None:
            group_size = DEFAULT_INT4_GROUP if scheme == "int4" else 0
        return cls(scheme, group_size, scale_dtype, "hadamard" if rotated else "none")

    @property
    def base_name(self) -> str:
        """The scheme, with ROTATED_SUFFIX when groups are rotated (a QUANTIZATIONS name)."""
        return self.scheme + (ROTATED_SUFFIX if self.rotation == "hadamard" else "")

    @property
    def name(self) -> str:
        """The name `named` takes: base_name, with the group size where int4's is not the default."""
        if self.scheme == "int4" and self.group_size != DEFAULT_INT4_GROUP:
            return f"{self.base_name}{GROUP_SUFFIX}{self.group_size}"
        return self.base_name

    def row_problem(self, width: int) -> str:
        """Why rows of `width` numbers cannot go through this quantization (group_of's reason), or
        "" where they can: one check for the eval's --wire, the sharer's --quantize and a card's codecs."""
        try:
            self.group_of(TensorSpec("bfloat16", (1, 1, width)))
        except ValueError as err:
            return str(err)
        return ""

    def fitting_name(self, width: int) -> str:
        """A quantization that can carry rows of `width` numbers, to suggest where group_of refuses
        them: for int4 the largest power-of-two group, at most this one's and at least 8, that
        divides `width` ("int4-hadamard-g32" for rows of 224); else int8 (one scale a row)."""
        group = 1
        while group * 2 <= (self.group_size or width) and width % (group * 2) == 0:
            group *= 2
        if self.scheme != "int4" or group < min(GROUP_SIZES):
            return "int8"
        return self.base_name if group == DEFAULT_INT4_GROUP else f"{self.base_name}{GROUP_SUFFIX}{group}"

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    def applies_to(self, spec: TensorSpec) -> bool:
        """Float tensors are quantized; integer ones (token spans) travel as they are."""
        return self.enabled and spec.dtype in FLOAT_DTYPES

    # -- shapes ----------------------------------------------------------------------------------

    def group_of(self, spec: TensorSpec) -> int:
        """Elements per scale for this tensor; ValueError where its shape cannot be grouped."""
        if not spec.shape or spec.shape[-1] == 0:
            raise ValueError(
                f"a {self.scheme} tensor needs a non-empty last dimension, not shape {spec.shape}"
            )
        row = spec.shape[-1]
        group = min(self.group_size, row) if self.group_size else row  # a narrow tensor: one group a row
        if row % group:
            raise ValueError(f"last dimension {row} is not a multiple of the group size {group}")
        if self.scheme == "int4" and row % 2:
            raise ValueError(f"int4 packs two codes a byte: last dimension {row} must be even")
        if self.rotation == "hadamard" and group & (group - 1):
            raise ValueError(f"a Hadamard rotation needs groups of a power of two, not {group}")
        return group

    def codes_spec(self, spec: TensorSpec) -> TensorSpec:
        if self.scheme == "int4":
            return TensorSpec("uint8", (*spec.shape[:-1], spec.shape[-1] // 2))
        return TensorSpec("int8", spec.shape)

    def scales_spec(self, spec: TensorSpec) -> TensorSpec:
        return TensorSpec(self.scale_dtype, (*spec.shape[:-1], spec.shape[-1] // self.group_of(spec)))

    def wire_specs(self, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The tensors a segment's blob holds for these declared tensors (codes, scales, the rest)."""
        wire: dict[str, TensorSpec] = {}
        for name, spec in specs.items():
            if not self.applies_to(spec):
                wire[name] = spec
                continue
            wire[name] = self.codes_spec(spec)
            wire[name + SCALES_SUFFIX] = self.scales_spec(spec)
        if len(wire) != len(specs) + sum(map(self.applies_to, specs.values())):
            raise ValueError(f"tensor names {sorted(specs)} collide with their {SCALES_SUFFIX} tensors")
        return wire

    # -- sender ----------------------------------------------------------------------------------

    def encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Declared tensors -> the blob's tensors, quantized on their own device, returned on the CPU."""
        wire: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not self.applies_to(TensorSpec.of(tensor)):
                wire[name] = tensor
                continue
            codes, scales = self.quantize(tensor)
            wire[name], wire[name + SCALES_SUFFIX] = codes.cpu(), _finite(scales.cpu(), name)
        return wire

    @torch.inference_mode()
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., n] -> (codes, scales [..., n/g]) on x's device (formulas in the module docstring)."""
        spec = TensorSpec.of(x)
        group, qmax = self.group_of(spec), QMAX[self.scheme]
        scale_dtype = DTYPES[self.scale_dtype][0]
        # a float32 copy of x, worked on in place (fewer passes over memory than fresh tensors)
        grouped = x.to(torch.float32, copy=True).reshape(*x.shape[:-1], -1, group)
        if self.rotation == "hadamard":
            grouped = grouped @ hadamard(group, grouped.device)
        absmax = grouped.abs().amax(dim=-1, keepdim=True)
        scales = (absmax / qmax).clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
        codes = grouped.div_(scales.float()).round_().clamp_(-qmax, qmax).reshape(x.shape)
        scales = scales.squeeze(-1)
        if self.scheme == "int8":
            return codes.to(torch.int8), scales
        # Packed while still float, (q_even + 8) + 16 (q_odd + 8), exact in float32: one pass
        # over half the values and one cast, instead of a cast of all of them, a shift and an or.
        pairs = codes.reshape(*x.shape[:-1], -1, 2)
        packed = torch.add(pairs[..., 0], pairs[..., 1], alpha=16).add_(INT4_OFFSET * 17)
        return packed.to(torch.uint8), scales

    # -- receiver --------------------------------------------------------------------------------

    def decode(
        self, wire: dict[str, torch.Tensor], specs: dict[str, TensorSpec], device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """The blob's tensors (checked against wire_specs) -> the declared tensors, on `device`."""
        tensors = {}
        for name, spec in specs.items():
            if self.applies_to(spec):
                tensors[name] = self.dequantize(wire[name], wire[name + SCALES_SUFFIX], spec, device)
            else:
                tensors[name] = wire[name].to(device)
        return tensors

    @torch.inference_mode()
    def dequantize(
        self, codes: torch.Tensor, scales: torch.Tensor, spec: TensorSpec, device: torch.device | str
    ) -> torch.Tensor:
        """x^ = q * s on `device` (the codes cross to it at 1 or 1/2 byte an element), as spec.dtype."""
        codes, scales = codes.to(device), scales.to(device)
        if self.scheme == "int4":  # each nibble straight into its float32 place, then q - 8 in place
            values = torch.empty(*codes.shape, 2, dtype=torch.float32, device=device)
            values[..., 0], values[..., 1] = codes & 0x0F, codes >> 4
            values = values.reshape(spec.shape).sub_(INT4_OFFSET)
        else:
            values = codes.float()
        group = self.group_of(spec)
        grouped = values.reshape(*spec.shape[:-1], -1, group).mul_(scales.float().unsqueeze(-1))
        if self.rotation == "hadamard":  # H is symmetric and orthonormal: its own inverse
            grouped = grouped @ hadamard(group, grouped.device)
        return grouped.reshape(spec.shape).to(DTYPES[spec.dtype][0])


def rows_problem(quantization: str, width: int) -> str:
    """Why packet rows of `width` numbers cannot go through `quantization` (a --quantize name, or
    "none": bf16, which carries any width), "" where they can."""
    return "" if quantization == "none" else Quantization.named(quantization).row_problem(width)


@functools.cache
def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The n x n Walsh-Hadamard matrix scaled to be orthonormal (H H = I), n a power of two:
    H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]] / sqrt(2) (Sylvester's construction)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix here is of a power of two, not {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0) / math.sqrt(2)
    return h.to(device)


def _finite(scales: torch.Tensor, name: str) -> torch.Tensor:
    """Scales of inf or NaN mean the tensor held inf / NaN, or values past the scale dtype's range."""
    if not torch.isfinite(scales).all():
        raise ValueError(
            f"tensor {name!r} cannot be quantized: it holds inf or NaN, or values too large for "
            f"{scales.dtype} scales"
        )
    return scales
