"""Turning whatever names a model (short name, directory, hub id) into a loaded, frozen model."""

from __future__ import annotations

import logging
import os
import time

import torch

from lcflow.provision.store import resolve_model

log = logging.getLogger(__name__)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"not a torch dtype: {dtype!r}")
    return value


def load_model_and_tokenizer(
    name_or_path: str,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer for inference: eval mode, every parameter frozen.

    `device` "auto" is CUDA when available, else CPU. `dtype` defaults to float32 (the cache stores
    float32, so this is a plain load); pass "bfloat16" on a GPU for speed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Weights dequantised from GGUF contain denormals; CPU matmuls on them are ~25x slower.
    torch.set_flush_denormal(True)
    source = resolve_model(name_or_path, cache_dir)
    target = pick_device(device)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_as_dtype(dtype)).to(target)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    log.info("loaded %s from %s on %s in %.1f s", name_or_path, source, target, time.perf_counter() - started)
    return model, tokenizer


def load_pair(sharer: str, receiver: str, device: str | torch.device = "auto") -> tuple[tuple, tuple]:
    """((sharer model, tokenizer), (receiver model, tokenizer)), one model loaded once where both
    names are the same (a same-model pair reads frozen weights on both sides)."""
    sharer_pair = load_model_and_tokenizer(sharer, device)
    return sharer_pair, sharer_pair if receiver == sharer else load_model_and_tokenizer(receiver, device)
