"""GGUF -> a plain Hugging Face directory (config, safetensors, tokenizer, generation config).

transformers can read a GGUF and dequantise it, but that takes 15-50 s per load and the loaded
model refuses `save_pretrained` (it still carries a GGUF quantization config). So we convert once:
load from the GGUF, copy the dequantised state dict into a fresh model built from the same
config without the quantization config, and save that. Later loads take a few seconds.

Weights are stored in float32. The GGUF values are 4-bit codes times fp16 scales, so float32
holds the dequantised weights exactly: the converted model computes what the GGUF model computes.
bfloat16 would halve the files (0.5 GB instead of 1.1 GB for Gemma3-270M) but round every weight a
second time, and on CPU, where this project mostly runs, matmuls are fastest in float32 anyway.
Callers who want bfloat16 on a GPU pass `dtype` when loading.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STORAGE_DTYPE = torch.float32


@dataclass
class ConversionReport:
    architecture: str
    parameters: int
    has_chat_template: bool
    gguf_load_s: float
    tokenizer_s: float
    save_s: float


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = STORAGE_DTYPE) -> ConversionReport:
    """Write a Hugging Face model directory for the GGUF file at `gguf_path` into `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Dequantised weights contain denormals; without this CPU forward passes run ~25x slower.
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype
    )
    loaded = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenized = time.perf_counter()

    plain = _without_quantization(quantized, dtype)
    del quantized
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    saved = time.perf_counter()

    report = ConversionReport(
        architecture=type(plain).__name__,
        parameters=sum(p.numel() for p in plain.parameters()),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        gguf_load_s=loaded - started,
        tokenizer_s=tokenized - loaded,
        save_s=saved - tokenized,
    )
    log.info("converted %s -> %s: %s", gguf_path.name, out_dir, report)
    return report


def _without_quantization(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A fresh model of the same config, minus the GGUF quantization config, with the same weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # strict: a tensor the GGUF lacks would otherwise be saved with its random initial value.
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()
