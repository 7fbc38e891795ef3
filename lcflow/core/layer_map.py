"""Which sharer layer feeds which receiver layer when the two models differ in depth."""

from __future__ import annotations

LAYER_MAP_STRATEGIES = ("monotonic", "last_aligned")


def build_layer_map(sharer_layers: int, receiver_layers: int, strategy: str = "monotonic") -> dict[int, int]:
    """Map every receiver layer t to a sharer layer s.

    monotonic:     s = round(t * (S - 1) / (R - 1)), relative depth kept (shallow to shallow, deep to deep).
    last_aligned:  C2C's choice, the last layers line up: s = clamp(t - (R - S), 0, S - 1).
    """
    if strategy == "monotonic":
        if receiver_layers == 1:
            return {0: sharer_layers - 1}
        scale = (sharer_layers - 1) / (receiver_layers - 1)
        return {t: round(t * scale) for t in range(receiver_layers)}
    if strategy == "last_aligned":
        offset = receiver_layers - sharer_layers
        return {t: min(max(t - offset, 0), sharer_layers - 1) for t in range(receiver_layers)}
    raise ValueError(f"unknown layer map strategy {strategy!r}; choose one of {LAYER_MAP_STRATEGIES}")
