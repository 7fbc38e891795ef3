"""LCF / LCF-X adapters (and the C2C baseline): configuration, halves, files."""

from lcflow.adapter.adapter import LatentAdapter
from lcflow.adapter.config import AdapterConfig, AdapterMismatchError

__all__ = ["AdapterConfig", "AdapterMismatchError", "LatentAdapter"]
