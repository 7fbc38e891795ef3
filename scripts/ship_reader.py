"""Copy a trained text reader into adapters/ with its weights in bf16, its training log and loss curve.

python scripts/ship_reader.py RUN_DIR ADAPTER_DIR RECEIVER_MODEL
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from lcflow.adapter.reader import TextReader
from lcflow.provision import load_model_and_tokenizer


def main(source: Path, target: Path, receiver: str) -> None:
    model, tokenizer = load_model_and_tokenizer(receiver, device="cpu")
    reader = TextReader.from_pretrained(source, model, tokenizer, name=receiver, merge=False)
    reader.save_pretrained(target, dtype=torch.bfloat16)
    for name in ("train_log.json", "loss_curve.png"):
        shutil.copy(source / name, target / name)
    print(f"shipped {source} as {target}: {', '.join(sorted(p.name for p in target.iterdir()))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
