"""Tiny random models with real tokenizers, for tests and for demos without downloaded weights.

Each model is written to a directory with `save_pretrained` and loaded back with
`from_pretrained`, so every code path that takes a model name is exercised for real.
The tokenizers are byte-level BPEs trained in milliseconds on a small built-in corpus;
two vocabulary sizes give two *different* tokenisations of the same text, which is what
the span aligner must handle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. Mira lives in Oslo and works as a baker.
Question: where does Mira live? Answer: Oslo. Lior plays the violin and owns a cat.
Ada Brook's mentor is Lior Senn. The capital of the region is a small harbour city.
Facts about people: name, city, job, pet, colour, sport, instrument. What is the colour?
""".strip()


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus (any text encodes; no unknowns)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, vocab_size: int, num_layers: int = 2):
    """A config of the given family small enough that a forward pass takes milliseconds."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if family == "llama":
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen2":
        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen3":
        return Qwen3Config(
            **common, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        )
    if family == "gemma3":
        # Gemma3 alternates sliding-window and full-attention layers with two RoPE bases.
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=32,
            layer_types=layer_types,
        )
    raise ValueError(f"unknown tiny family {family!r}: use llama, qwen2, qwen3 or gemma3")


def make_tiny_model(
    directory: str | Path, family: str = "llama", vocab_size: int = 400, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a random tiny model of `family` and its tokenizer to `directory`; returns the path."""
    directory = Path(directory)
    tokenizer = train_tokenizer(vocab_size)
    config = tiny_config(family, len(tokenizer), num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_tiny(directory: str | Path):
    """Load a tiny model back with the ordinary `from_pretrained`, frozen and in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(directory)
