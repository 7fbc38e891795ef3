"""What the sharer's `--codec auto` sends on the link to the receiver, and why: which quantization
and whether zstd goes on top.

Both make the bytes fewer and cost CPU on both ends, so they pay on slow links and can lose on
fast ones: on a small machine's loopback, quantizing a long LCF packet to int4 can take longer
than sending its bf16 bytes. The quantizations offered are the accurate ones of the
adapter's model card (within 1 EM point of bf16: lcflow.serving.registry.card_codecs), so the
choice moves time, never answers. Two ways to tell which link this is:

- **Measured** (no `--link-mbit`): the meter keeps, per payload (the handoff's mode: an LCF
  packet grows with the context, an LCF-X one is small and fixed, so their costs per byte differ),
  quantization scheme and codec (an "arm", written int4/none), the time a handoff's latents cost
  beyond encoding (quantizing and packing, the link, unpacking: the receiver's latent window
  minus the sharer's encode time) per raw byte: the least of its last WINDOW handoffs, since
  whatever else runs on the machine only ever adds time (one slow handoff must not flip the
  choice; a link that got slow shows once WINDOW handoffs in a row are slow). The first
  handoffs of a kind go round the arms, fewest bytes first (one scheme: zstd, none, zstd, none),
  until each has been measured PROBES times; from then on the cheapest, with one of the others
  tried again every EXPLORE_EVERY handoffs so that a changed link shows (which one: the longest
  untried for its cost, LinkMeter._stalest). This is what decides on loopback and on this
  2-core machine, where "the link" is gRPC's own CPU time and no model of it held (the rule
  below said zstd pays there, and none was faster).

- **Configured** (`--link-mbit R`): a rule. Sending S serialised bytes takes S/R; compressing
  first at C bytes/s with ratio r, then decompressing at D, takes S/C + S/(r R) + S/D (on small
  CPUs they do not overlap). zstd pays when

      R < (1 - 1/r) / (1/C + 1/D)

  C, r and D per scheme are priors (PRIORS: `lcflow bench transport --tokens 2048 --quantize none
  int8 int4`, a 2048-token LCF packet of the paper pair's shapes; the measurements and the link
  speeds below which zstd pays for each scheme: docs/results/transport-design.md), refined per
  payload by this sharer's own zstd handoffs.

  A configured link is taken to be a network between nodes, so the rule sends the smallest
  quantization offered (the card's choice): the bytes are what the link charges for, and on a
  GPU sharer quantizing costs next to nothing.

One meter per sharer: with several receivers behind one target, gRPC picks the receiver after
the codec is chosen, so the costs are those of recent handoffs to any of them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from lcflow.core.names import split_group

SMOOTHING = 0.5  # weight of zstd's newest speed and ratio measurement (record_compression)
PROBES = 2  # handoffs each codec is measured on before the meter compares them
WINDOW = 3  # a codec's cost is the least over its last WINDOW handoffs
# Once every arm is measured, every EXPLORE_EVERY-th handoff re-tries another: often enough that a
# changed link shows, rarely enough that re-trying a costly arm does not cost auto its lead over
# the best fixed codec (docs/results/transport-design.md).
EXPLORE_EVERY = 32


@dataclass(frozen=True)
class Compression:
    """zstd on one kind of payload: compress and decompress throughput (serialised bytes/s), ratio."""

    compress_bytes_per_s: float
    decompress_bytes_per_s: float
    ratio: float

    def pays_below(self) -> float:
        """The link rate (bytes/s) under which compressing saves time (the rule above)."""
        if self.ratio <= 1.0:
            return 0.0
        cpu_s_per_byte = 1.0 / self.compress_bytes_per_s + 1.0 / self.decompress_bytes_per_s
        return (1.0 - 1.0 / self.ratio) / cpu_s_per_byte


PRIORS = {
    "none": Compression(722e6, 1114e6, 1.50),
    "int8": Compression(753e6, 768e6, 1.07),
    "int4": Compression(747e6, 711e6, 1.16),
}
# Not measured on its own: the same nibbles and scales as int4. Rotated groups are closer to
# Gaussian, which compresses no better, so int4's prior is the optimistic side for zstd.
PRIORS["int4-hadamard"] = PRIORS["int4"]


@dataclass(frozen=True)
class CodecChoice:
    """The wire codec for one transfer, and in words why (for the summary and the trace)."""

    name: str  # the segment codec: "zstd" or "none"
    reason: str
    quantization: str = "none"  # one of the schemes `choose` was offered


def _mb(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.0f} MB/s"


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else SMOOTHING * new + (1 - SMOOTHING) * old


class LinkMeter:
    """What zstd and the link have cost on recent handoffs; `choose` applies the module's rules.

    Thread-safe: handoffs record and choose from gRPC's worker threads."""

    def __init__(self, link_mbit: float = 0.0):
        self.configured = link_mbit * 1e6 / 8 if link_mbit > 0 else None  # bytes/s
        # (payload, scheme) -> zstd's speeds and ratio, from PRIORS[scheme] on
        self.compression: dict[tuple[str, str], Compression] = {}
        # (payload, scheme, codec) -> ms per raw MB of its last WINDOW handoffs
        self.costs: dict[tuple[str, str, str], deque[float]] = {}
        self._turns: dict[str, int] = {}  # handoffs chosen per payload, for exploration
        self._tried_at: dict[tuple[str, tuple[str, str]], int] = {}  # (payload, arm) -> its last turn
        self._lock = threading.Lock()

    def record(self, scheme: str, codec: str, raw_bytes: int, cost_ms: float, payload: str = "") -> None:
        """One handoff's latents: `raw_bytes` of bf16 represented cost `cost_ms` beyond encoding."""
        if raw_bytes <= 0:
            return
        per_mb = max(cost_ms, 0.0) / raw_bytes * 1e6
        key = (payload, scheme, codec)
        with self._lock:
            self.costs.setdefault(key, deque(maxlen=WINDOW)).append(per_mb)

    def record_handoff(self, scheme: str, codec: str, stats, cost_ms: float, payload: str = "") -> None:
        """One handoff sent as `scheme`/`codec`: its cost beyond encoding (record) and, with zstd,
        what zstd did (record_compression). `stats`: the sender's WireStats of that handoff."""
        self.record(scheme, codec, stats.bytes_raw, cost_ms, payload)
        if codec == "zstd":
            self.record_compression(scheme, stats.bytes_serialised, stats.bytes_wire, stats.codec_ms, payload)

    def cost(self, scheme: str, codec: str, payload: str = "") -> float | None:
        """ms per raw MB that `codec` costs on this kind of payload: the least of its recent
        handoffs (None before the first)."""
        recent = self.costs.get((payload, scheme, codec))
        return min(recent) if recent else None

    def record_compression(
        self, scheme: str, serialised_bytes: int, wire_bytes: int, compress_ms: float, payload: str = ""
    ) -> None:
        """What zstd did on one handoff of `scheme` payload, as the sender saw it: bytes in and out,
        and time. (The receiver's unpack time mixes decompression with the rest, so D stays the prior.)"""
        if serialised_bytes <= 0 or wire_bytes <= 0 or compress_ms <= 0:
            return
        with self._lock:
            old = self._compression(payload, scheme)
            self.compression[(payload, scheme)] = Compression(
                _smooth(old.compress_bytes_per_s, serialised_bytes / compress_ms * 1000.0),
                old.decompress_bytes_per_s,
                _smooth(old.ratio, serialised_bytes / wire_bytes),
            )

    def choose(self, schemes: str | Sequence[str], payload: str = "") -> CodecChoice:
        """The quantization (one of `schemes`, largest first: the accurate ones of the adapter's
        card, lcflow.serving.registry.card_codecs) and zstd or none for a `payload` (the
        handoff's mode)."""
        schemes = (schemes,) if isinstance(schemes, str) else tuple(schemes)
        with self._lock:
            if self.configured is not None:
                return self._by_rule(schemes[-1], payload)
            return self._by_measurement(schemes, payload)

    def _compression(self, payload: str, scheme: str) -> Compression:
        prior = PRIORS.get(split_group(scheme)[0], PRIORS["none"])  # int4-g32: int4's bytes, more scales
        return self.compression.get((payload, scheme), prior)

    def _by_rule(self, scheme: str, payload: str) -> CodecChoice:
        """A configured link is a network between nodes: the fewest bytes, so the smallest
        quantization offered (on a GPU sharer quantizing costs next to nothing), and zstd where
        the rule says it pays."""
        compression = self._compression(payload, scheme)
        threshold = compression.pays_below()
        name = "zstd" if self.configured < threshold else "none"
        return CodecChoice(
            name,
            f"link {_mb(self.configured)} configured; zstd pays below {_mb(threshold)} on {scheme} "
            f"payloads (ratio {compression.ratio:.2f}, compress {_mb(compression.compress_bytes_per_s)}, "
            f"decompress {_mb(compression.decompress_bytes_per_s)})",
            scheme,
        )

    def _by_measurement(self, schemes: tuple[str, ...], payload: str) -> CodecChoice:
        """Probe each (scheme, codec) arm, fewest bytes first, until each has PROBES handoffs; then
        the cheapest, and every EXPLORE_EVERY-th handoff one of the others (_stalest)."""
        arms = [(scheme, codec) for scheme in reversed(schemes) for codec in ("zstd", "none")]
        counts = {arm: len(self.costs.get((payload, *arm), ())) for arm in arms}
        unmeasured = [arm for arm in arms if counts[arm] < PROBES]
        if unmeasured:  # the least measured, fewest bytes first: zstd, none, zstd, ... for one scheme
            arm = min(unmeasured, key=counts.get)
            turn = self._turns.get(payload, 0)
            return self._tried(payload, arm, turn, self._probe_reason(payload, arm, counts, len(arms)))
        turn = self._turns[payload] = self._turns.get(payload, 0) + 1  # handoffs since all were measured
        costs = {arm: self.cost(*arm, payload) for arm in arms}
        best = min(arms, key=costs.get)  # ties: the first, i.e. fewer bytes
        listed = ", ".join(f"{_arm_name(arm)} {costs[arm]:.1f}" for arm in arms)
        measured = f"ms/MB: {listed} (least of recent {payload + ' ' if payload else ''}handoffs)"
        if turn % EXPLORE_EVERY == 0:
            other = self._stalest(payload, arms, best, costs, turn)
            why = f"{measured}; trying {_arm_name(other)} again (every {EXPLORE_EVERY}th handoff)"
            return self._tried(payload, other, turn, why)
        return self._tried(payload, best, turn, f"{measured}: {_arm_name(best)} is cheapest")

    def _stalest(self, payload: str, arms: list, best: tuple, costs: dict, turn: int) -> tuple[str, str]:
        """The arm to re-measure: the longest untried for its cost, handoffs since it was last
        tried over its cost relative to the best's. Near-ties come back often (a link that
        changed shows there first) and an arm 4x as dear a quarter as often, so re-measuring
        never costs more than ~1/EXPLORE_EVERY of a handoff on average per arm."""
        others = [arm for arm in arms if arm != best]
        costs = {arm: max(cost, 1e-9) for arm, cost in costs.items()}  # a handoff measured as free
        return max(
            others, key=lambda arm: (turn - self._tried_at.get((payload, arm), 0)) * costs[best] / costs[arm]
        )

    def _tried(self, payload: str, arm: tuple[str, str], turn: int, reason: str) -> CodecChoice:
        self._tried_at[(payload, arm)] = turn
        return CodecChoice(arm[1], reason, arm[0])

    @staticmethod
    def _probe_reason(payload: str, arm: tuple[str, str], counts: dict, arms: int) -> str:
        kind = f"{payload} " if payload else ""
        if not any(counts.values()):
            return f"first {kind}handoff: {_arm_name(arm)} (fewest bytes) until each of {arms} codecs is measured"
        return f"measuring {_arm_name(arm)} on {kind}payloads ({counts[arm] + 1} of {PROBES} handoffs)"


def _arm_name(arm: tuple[str, str]) -> str:
    """(quantization, segment codec) as the summary writes a codec: "int4/none"."""
    return f"{arm[0]}/{arm[1]}"
