"""Adapters: a directory with a config and safetensors; the base models stay frozen.

- adapter.py: LatentAdapter, the two halves of an LCF or LCF-X adapter, from_pretrained / save_pretrained.
- config.py: AdapterConfig and the model identities it is checked against.
- lcf.py: LCF, the same-context per-token joint K/V bottleneck with gates.
- lcfx.py: LCF-X slot packets.
- spans.py: LCF-X span packets: the selected positions' K/V through a trained map.
- bridge.py: LCF-X across tokenizers: the selected sentences as soft tokens.
- c2c.py: the C2C baseline's fuser.
- reader.py: text readers, LoRA adapters on the receiver (PEFT).
- blocks.py: shared layers (RMSNorm, parameter counts).
- card.py: model cards: model_card.json and README.md from an eval.
"""

from lcflow.adapter.adapter import LatentAdapter
from lcflow.adapter.config import AdapterConfig, AdapterMismatchError

__all__ = ["AdapterConfig", "AdapterMismatchError", "LatentAdapter"]
