"""A text reader: a LoRA adapter (Hugging Face PEFT) on the receiver, trained to read a text channel.

The control that decides whether latents earn their place. LCF-X's span adapter is, in effect, a
reader trained for its task; a text channel read by the untrained receiver is not a fair rival
to it. The text reader gets the same training as the LCF-X adapter it is compared with (the same
samples, steps, batch and loss: answer cross-entropy + kl_weight * KL to the receiver reading
the whole document), but the sharer's knowledge reaches it as text:

    channel "forward-selected"   the sentences that hold LCF-X's selected positions (the same
                                 selection head, question and budget), lcflow.handoff.pair.Sharer.selected_text
    channel "forward"            the sharer's whole document
    channel "lcfx"               no text: the LCF-X packet itself; a span adapter trained with
                                 `--receiver-lora` keeps such a LoRA in its RECEIVER_READER folder,
                                 so latents get the same receiver-side capacity a text reader has

LoRA on the receiver's attention projections: W' = W + (alpha / r) B A, with A [r, d_in] and
B [d_out, r], B = 0 at the start (so an untrained reader is the receiver itself).

    reader = TextReader.for_model(model, tokenizer, "forward-selected", rank=16)   # to train
    reader.save_pretrained(directory)    # PEFT's adapter_config.json + adapter_model.safetensors,
                                         # and reader_config.json (channel, receiver identity, training)
    reader = TextReader.from_pretrained(directory, model, tokenizer)   # refuses another receiver
    reader.model                         # its own receiver model with the LoRA merged in

The base receiver is never modified: the reader wraps a copy of it (one more copy of the
receiver's weights in memory), so every other method keeps the plain model and a service can
serve both at once without switching adapters under concurrent requests.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lcflow.adapter.config import AdapterMismatchError
from lcflow.core.kv import ModelIdentity, model_identity

READER_CONFIG = "reader_config.json"
# "lcfx": not a text channel but the LCF-X packet itself: a LoRA trained beside a span adapter's
# decoder (`lcflow train --receiver-lora`), kept in that adapter's RECEIVER_READER folder.
CHANNELS = ("forward-selected", "forward", "lcfx")
RECEIVER_READER = "receiver-reader"
# The attention projections every supported family names alike (Llama, Gemma3, Qwen).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ReaderConfig:
    """What a text reader reads, for which receiver, and how it was made."""

    channel: str
    receiver: ModelIdentity
    rank: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = TARGET_MODULES
    # forward-selected: the LCF-X adapter whose selection (head, budget) made the training text
    selection_adapter: str = ""
    training: dict = field(default_factory=dict)
    mode: str = "text-reader"  # tells a reader directory from a latent adapter's

    def __post_init__(self):
        if self.channel not in CHANNELS:
            raise ValueError(f"a text reader reads one of {', '.join(CHANNELS)}, not {self.channel!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["receiver"] = self.receiver.to_dict()
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ReaderConfig:
        data = dict(data)
        data["receiver"] = ModelIdentity.from_dict(data["receiver"])
        data["target_modules"] = tuple(data.get("target_modules", TARGET_MODULES))
        return cls(**data)

    @classmethod
    def load(cls, directory: str | Path) -> ReaderConfig:
        path = Path(directory) / READER_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {READER_CONFIG}: not a text reader directory")
        return cls.from_dict(json.loads(path.read_text()))


def is_reader_dir(directory: str | Path) -> bool:
    return (Path(directory) / READER_CONFIG).is_file()


class TextReader:
    """The receiver with a LoRA adapter: `model` is a PEFT model while training, and a plain model
    with the LoRA merged in once loaded for use (`from_pretrained`)."""

    def __init__(self, model, tokenizer, config: ReaderConfig, lora_parameters: int = 0):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lora_parameters = lora_parameters  # the LoRA's size, still known once merged in

    @classmethod
    def for_model(
        cls, model, tokenizer, channel: str, rank: int = 16, alpha: int | None = None, name: str | None = None
    ) -> TextReader:
        """A fresh reader (B = 0: it reads exactly as the receiver does) on a copy of `model`;
        alpha defaults to 2 * rank."""
        alpha = alpha or 2 * rank
        from peft import LoraConfig, get_peft_model

        config = ReaderConfig(channel, model_identity(model, tokenizer, name=name), rank, alpha)
        lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES), lora_dropout=0.0)
        peft_model = get_peft_model(copy.deepcopy(model), lora)
        return cls(peft_model, tokenizer, config)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, model, tokenizer, name: str | None = None, merge: bool = True
    ) -> TextReader:
        """Load a reader for `model`, refusing one trained for another receiver. With `merge` the
        LoRA is folded into a copy of the weights (no per-token LoRA cost); without, the PEFT
        model is kept (to go on training it)."""
        from peft import PeftModel

        config = ReaderConfig.load(directory)
        actual = model_identity(model, tokenizer, name=name)
        if not config.receiver.same_model(actual):
            raise AdapterMismatchError(
                f"this text reader's receiver is {config.receiver.short()} but the receiver model given is "
                f"{actual.short()}; use the reader trained for this receiver or train one with "
                "`lcflow train --mode text-reader`"
            )
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(directory), is_trainable=not merge)
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        reader_model = peft_model.merge_and_unload() if merge else peft_model
        reader_model.eval()
        return cls(reader_model, tokenizer, config, lora_parameters=lora)

    # --- what the trainer needs (lcflow.training.reader) ---------------------------------------

    def named_parameters(self):
        """The LoRA weights only: the receiver's own stay frozen."""
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def parameter_counts(self) -> dict[str, int]:
        """The LoRA's parameters (those being trained, or those merged into the loaded copy)."""
        return {"total": sum(p.numel() for p in self.parameters()) or self.lora_parameters}

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)

    def load_weights(self, directory: str | Path) -> None:
        """Put the LoRA weights a reader directory holds (save_pretrained's) into this reader."""
        from safetensors.torch import load_file

        self.load_state_dict(load_file(Path(directory) / "adapter_model.safetensors"))

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """PEFT's files (adapter_config.json, adapter_model.safetensors) and reader_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        if dtype is not None:  # PEFT saves the training dtype; ship the chosen one
            from safetensors.torch import load_file, save_file

            weights = directory / "adapter_model.safetensors"
            save_file({k: v.to(dtype).contiguous() for k, v in load_file(weights).items()}, weights)
        (directory / READER_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        return directory


def receiver_reader_model(adapter_dir: str | Path, model, tokenizer, name: str | None = None):
    """The receiver with a span adapter's own LoRA merged in (its RECEIVER_READER folder), or
    None when the adapter has none (its decoder alone reads the packet)."""
    directory = Path(adapter_dir) / RECEIVER_READER
    if not directory.is_dir():
        return None
    reader = TextReader.from_pretrained(directory, model, tokenizer, name=name)
    if reader.config.channel != "lcfx":
        raise ValueError(f"{directory} reads {reader.config.channel}, not an LCF-X packet")
    return reader.model
