"""Experiment: how should a span packet select in a document of 2,000-4,000 tokens?

The shipped Gemma3 adapter selects whole sentences by its retrieval head's attention from the
question, one softmax over the whole context (lcflow.packets.selection). On facts-cross-longer
its 32 positions hold the asked fact in about a third of the documents, and LCF-X answers about
as often. This probe sweeps, on the family's *train* split (what the choice is made on) and its
test split (reported, never chosen on):

    heads      the shipped head, and each of the sharer's best heads on the train samples
    chunk      0 (one softmax over the whole context) or c (each chunk of c positions
               normalised with the sink alone: `selection.chunk_softmax`)
    m          the budget in tokens

and reports answer recall: does the selection (whole sentences by mean attention per token,
`top_sentences`) cover the answer?

    python -m lcflow.research.long_selection --model gemma3-270m --n 40 --out recall.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from tqdm import tqdm

from lcflow.packets.selection import answer_selected, top_sentences
from lcflow.provision.loading import load_model_and_tokenizer
from lcflow.tasks import get_task
from lcflow.training.heads import read_heads_by_chunk

TASK = "facts-cross-longer"
CHUNKS = (0, 64, 128, 256, 512)
BUDGETS = (32, 64, 128)


def recall(readings, heads: list[tuple[int, int]], chunk: int, m: int) -> float:
    """Share of documents whose selection by the mean of `heads` covers the answer."""
    hits = []
    for sample, scores, spans in readings:
        combined = torch.stack([scores[chunk][t, h] for t, h in heads]).mean(dim=0)
        hits.append(
            bool(
                answer_selected(sample, spans, top_sentences(combined, spans, sample.sharer_context, m, True))
            )
        )
    return statistics.fmean(hits)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3-270m", help="the sharer model")
    parser.add_argument("--n", type=int, default=40, help="samples per split")
    parser.add_argument(
        "--shipped-head", default="5,2", help="the shipped adapter's retrieval head, LAYER,HEAD"
    )
    parser.add_argument("--layers", type=int, default=6, help="run the question through this many layers")
    parser.add_argument("--out", help="write every recall as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    readings = {}
    for split in ("train", "test"):
        rows = []
        for sample in tqdm(get_task(TASK).samples(split, args.n, seed=0), desc=split):
            scores, spans = read_heads_by_chunk(model, tokenizer, sample, CHUNKS, layers=args.layers)
            if answer_selected(sample, spans, torch.arange(spans.shape[0])) is not None:
                rows.append((sample, scores, spans))
        readings[split] = rows
    layers, heads = readings["train"][0][1][0].shape[:2]
    full_view = [t for t in range(layers) if not readings["train"][0][1][0][t, 0, 0].isnan()]
    # Rank single heads on the train split at the shipped setting (whole softmax, m=32).
    ranked = sorted(
        ((recall(readings["train"], [(t, h)], 0, 32), t, h) for t in full_view for h in range(heads)),
        reverse=True,
    )
    shipped = tuple(int(x) for x in args.shipped_head.split(","))
    head_sets = {f"L{shipped[0]}H{shipped[1]} (shipped)": [shipped]}
    head_sets |= {f"L{t}H{h}": [(t, h)] for _, t, h in ranked[:2] if (t, h) != shipped}
    rows = []
    for (name, chosen), chunk, m in itertools.product(head_sets.items(), CHUNKS, BUDGETS):
        row = {"heads": name, "chunk": chunk, "m": m}
        row |= {split: round(recall(readings[split], chosen, chunk, m), 3) for split in ("train", "test")}
        rows.append(row)
        print(
            f"{name:18s} chunk {chunk:>3}  m {m:>3}  train {row['train']:.3f}  test {row['test']:.3f}",
            flush=True,
        )
    if args.out:
        record = {
            "model": args.model,
            "task": TASK,
            "samples": {split: len(r) for split, r in readings.items()},
            "ranked_train": ranked[:8],
            "recall": rows,
            "seconds": round(time.perf_counter() - started),
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
