"""What one training run is asked to do: a dataclass with no heavy imports.

`lcflow train --help` shows these defaults, so the parser reads them without importing torch
(see lcflow.core.names); lcflow.training.train runs them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    sharer: str
    receiver: str
    out: str
    mode: str = "lcfx"  # lcf | lcfx | c2c | text-reader
    task: str = "facts-cross"
    # The user's own samples instead of `task` (JSONL, the format `lcflow eval --task-file` reads):
    # a seeded share of them is held out for validation, and the split is recorded (OUT/split.json).
    task_file: str = ""
    validation: float = 0.1
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-4
    gate_lr: float = 1e-2
    warmup: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    gate_l1: float = 0.0  # pressure towards closed gates (prunable layers)
    seed: int = 0
    bottleneck: int = 128
    slots: int = 32
    receiver_aware: bool = True
    layer_map: str = "monotonic"
    # LCF-X without init_adapter: "spans" runs the whole span recipe (lcflow.training.lcfx_recipe:
    # alignment, heads, distillation); "slots" trains the pooled slot packet from scratch.
    packet: str = "spans"
    checkpoint_every: int = 50
    device: str = "auto"
    # Span-packet LCF-X: start from this adapter (`lcflow align --adapter-out`) and distil from
    # the receiver reading the document (lcflow.training.distill); KL weight beside the CE.
    init_adapter: str = ""
    kl_weight: float = 1.0
    # Span-packet LCF-X with init_adapter: the KL's teacher is the receiver reading this adapter's
    # packet (a full-width one, to distil a narrower bottleneck from it) instead of the document.
    teacher_adapter: str = ""
    # Span-packet LCF-X: hinge that asks the right packet to explain the answer better than
    # another sample's packet by `contrast_margin` nats (lcflow.training.distill); 0 = off.
    contrast_weight: float = 0.0
    contrast_margin: float = 1.0
    # Span-packet LCF-X with init_adapter: also train a LoRA of this rank on the receiver (the
    # capacity a text reader has), saved in OUT/receiver-reader; 0 = the decoder alone reads.
    receiver_lora: int = 0
    # The latents' number format on the way to the receiver (names.WIRE_FORMS): "exact" trains on
    # them as encoded; "bf16" / "int8" / "int4" puts them through that wire codec, with a
    # straight-through gradient, so the decoder learns to read what the services send.
    wire: str = "exact"
    # Text reader (mode text-reader, lcflow.training.reader): the channel it learns to read and the
    # LoRA rank; forward-selected takes its selection from the LCF-X adapter `init_adapter`.
    channel: str = "forward-selected"
    rank: int = 16
    # Text reader: start from this trained reader's LoRA weights (same channel and rank) instead of
    # zero, e.g. to give a reader the same further training as an LCF-X adapter refined from a
    # shipped one (the fair control for `--init-adapter` fine-tuning on a new family).
    init_reader: str = ""
