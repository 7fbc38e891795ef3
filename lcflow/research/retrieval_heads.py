"""Experiment: do a few attention heads find the asked fact better than all heads averaged?

LCF-X picks the sentences its packet carries by the question's attention, averaged over every
head of every layer. That often misses the answer: in long documents for Gemma3-270M, and in
short ones too for SmolLM2-135M (docs/lcfx.md, section 5, with this probe's results). "Retrieval
heads" (Wu et al., 2024) are a few heads that copy from where the asked fact sits. This probe
scores every head alone on *training* samples (facts-cross, train split): does the sentence
selection by that head's attention cover the answer? It then averages the best K heads and
measures answer recall on held-out samples (facts-cross test, the long variant, and the unseen
ships family).

    python -m lcflow.research.retrieval_heads --model smollm2-135m-instruct [--train 150] [--n 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from lcflow.packets.selection import (
    answer_selected,
    tokens_by_sentence,
    top_sentences,
)
from lcflow.provision.loading import load_model_and_tokenizer
from lcflow.tasks import get_task, load_task_file
from lcflow.training.heads import read_heads

SHIPS = "lcflow/data/tasks/ships-cross.jsonl"


def fast_recall(scores: torch.Tensor, groups: list[list[int]], answer_group: int, m: int) -> bool:
    """Whole sentences by mean score while they fit in m: is the answer's sentence among them?
    (top_sentences without the token fill, for sweeping hundreds of heads.)"""
    order = sorted(range(len(groups)), key=lambda g: float(scores[groups[g]].mean()), reverse=True)
    used = 0
    for g in order:
        if used + len(groups[g]) <= m:
            used += len(groups[g])
            if g == answer_group:
                return True
    return False


def answer_group(sample, spans: torch.Tensor, groups: list[list[int]]) -> int | None:
    for index, group in enumerate(groups):
        if answer_selected(sample, spans, torch.tensor(group)):
            return index
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--train", type=int, default=150, help="facts-cross train samples to rank heads on")
    parser.add_argument("--n", type=int, default=100, help="held-out samples per test set")
    parser.add_argument("--m", type=int, default=32, help="packet budget in tokens")
    parser.add_argument("--out", help="write the ranking and recalls as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)

    hits = None
    counted = 0
    for sample in tqdm(get_task("facts-cross").samples("train", args.train, seed=0), desc="rank heads"):
        per_head, spans = read_heads(model, tokenizer, sample)
        groups = tokens_by_sentence(spans, sample.sharer_context)
        target = answer_group(sample, spans, groups)
        if target is None:
            continue
        layers, heads, _ = per_head.shape
        got = torch.tensor(
            [
                [fast_recall(per_head[t, h], groups, target, args.m) for h in range(heads)]
                for t in range(layers)
            ]
        )
        hits = got.float() if hits is None else hits + got.float()
        counted += 1
    rate = hits / counted
    ranked = sorted(
        ((float(rate[t, h]), t, h) for t in range(rate.shape[0]) for h in range(rate.shape[1])), reverse=True
    )
    print(
        f"{counted} train samples; best heads: " + ", ".join(f"L{t}H{h} {r:.2f}" for r, t, h in ranked[:12])
    )

    sets = {"all": None} | {f"top{k}": [(t, h) for _, t, h in ranked[:k]] for k in (1, 2, 4, 8, 16)}
    tests = {
        "facts-cross": get_task("facts-cross").samples("test", args.n, seed=0),
        "facts-cross-long": get_task("facts-cross-long").samples("test", min(args.n, 40), seed=0),
        "ships-cross": load_task_file(SHIPS)[: args.n],
        "facts-cross-train": get_task("facts-cross").samples("train", args.train, seed=0),
    }
    results: dict[str, dict[str, float]] = {}
    for test, samples in tests.items():
        found: dict[str, list[bool]] = {name: [] for name in sets}
        for sample in tqdm(samples, desc=test):
            per_head, spans = read_heads(model, tokenizer, sample)
            seen = ~per_head[:, 0, 0].isnan()
            for name, heads in sets.items():
                scores = (
                    per_head[seen].mean(dim=(0, 1))
                    if heads is None
                    else torch.stack([per_head[t, h] for t, h in heads]).mean(dim=0)
                )
                chosen = top_sentences(scores, spans, sample.sharer_context, args.m, per_token=True)
                hit = answer_selected(sample, spans, chosen)
                if hit is not None:
                    found[name].append(hit)
        results[test] = {name: round(statistics.fmean(v), 3) for name, v in found.items() if v}
        print(test, f"(n={len(found['all'])})", results[test], flush=True)
    if args.out:
        record = {
            "model": args.model,
            "train": counted,
            "m": args.m,
            "ranked": ranked[:32],
            "recall": results,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
