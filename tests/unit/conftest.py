"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from lcflow.adapter import LatentAdapter
from lcflow.core.kv import model_identity


@pytest.fixture(scope="module")
def lcfx_dir(tiny_pair, tmp_path_factory):
    """An untrained LCF-X adapter for the tiny pair (b=16, 4 slots), saved as a directory."""
    (ms, ts), (mr, tr) = tiny_pair
    adapter = LatentAdapter.for_models(
        "lcfx", model_identity(ms, ts), model_identity(mr, tr), bottleneck=16, slots=4
    )
    return adapter.save_pretrained(tmp_path_factory.mktemp("adapter") / "lcfx")
