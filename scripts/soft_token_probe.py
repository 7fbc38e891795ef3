"""Experiment: can Gemma3-270M read SmolLM2's context as translated *input embeddings*?

Across families the per-token KV translation is unreadable (docs/lcfx.md, section 1: the
first layers, which carry token identity, fit with R^2 0.30). This probe asks whether the
receiver reads the sharer's selected sentences better when they arrive as soft tokens, vectors
in its own input-embedding space that its own layers then turn into KV (as xRAG does with a
retriever's embedding). Nothing is trained; measured on held-out facts-cross test samples:

    fit      ridge from SmolLM2's K/V (layers 0-3, RoPE removed) to Gemma3's input embedding
             of the same characters, on `--documents` alignment-corpus documents (train split)
    held-out R^2 of the embeddings, and how often the nearest vocabulary entry (cosine) is
             the true token
    rungs    the sentences SmolLM2's question attention selects (<= 32 sharer tokens), placed
             where the document would sit in Gemma3's input (lcflow.crosscontext.placement):
               own-emb     Gemma3's own embeddings of those sentences (the ceiling of soft tokens)
               soft        the translated embeddings
               soft-wrong  translated, from another sample's document (a control)

    python scripts/soft_token_probe.py [--documents 600] [--n 60]     (~10 min on 2 CPU cores)

Results are in docs/lcfx.md ("Soft tokens across families").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lcflow.align import align_spans
from lcflow.crosscontext.corpus import alignment_corpus
from lcflow.crosscontext.oracles import read_as_sharer
from lcflow.crosscontext.placement import document_ids, finish_input, slot_layout
from lcflow.crosscontext.selection import top_sentences
from lcflow.handoff import GenerationSettings, generate_text
from lcflow.kv import capture_kv, full_cache, prefill
from lcflow.metrics import contains_answer, exact_match, extract_answer
from lcflow.prompting import tokenize_context
from lcflow.provision.loading import load_model_and_tokenizer
from lcflow.tasks import get_task, question_prompt

SHARER_LAYERS = [0, 1, 2, 3]


def sharer_features(captured) -> torch.Tensor:
    """[tokens, 4 x kv_dim]: the sharer's K/V of the first layers, per token."""
    return torch.cat([captured.joint(layer)[0] for layer in SHARER_LAYERS], dim=-1)


class Probe:
    def __init__(self):
        self.s_model, self.s_tok = load_model_and_tokenizer("smollm2-135m-instruct")
        self.r_model, self.r_tok = load_model_and_tokenizer("gemma3-270m")
        self.embed = self.r_model.get_input_embeddings()  # Gemma3 scales inside: these are model inputs

    @torch.no_grad()
    def pairs(self, document: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per receiver token of `document`: the mean features of the sharer tokens it overlaps,
        its embedding and its id."""
        ids, s_spans = tokenize_context(self.s_tok, document)
        captured = capture_kv(self.s_model, prefill(self.s_model, ids, full_cache()))
        r_ids, r_spans = document_ids(self.r_tok, document)
        alignment = align_spans(s_spans, r_spans)  # rows: receiver tokens
        x = alignment.apply(sharer_features(captured))
        return x[alignment.covered], self.embed(r_ids)[0][alignment.covered], r_ids[0][alignment.covered]

    @torch.no_grad()
    def fit(self, documents: list[str], ridge: float = 1e-3) -> None:
        """Ridge regression on the pairs of `documents` (see fit_from)."""
        xs, ys = zip(*[self.pairs(d)[:2] for d in documents], strict=True)
        self.fit_from(torch.cat(xs), torch.cat(ys), ridge)

    @torch.no_grad()
    def fit_from(self, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> None:
        """Ridge regression y = mu_y + (x - mu_x) B, from moments (float64)."""
        x, y = x.double(), y.double()
        self.mu_x, self.mu_y = x.mean(0), y.mean(0)
        xc, yc = x - self.mu_x, y - self.mu_y
        sxx, sxy = xc.T @ xc / len(x), xc.T @ yc / len(x)
        lam = ridge * sxx.diagonal().mean()
        self.beta = torch.linalg.solve(sxx + lam * torch.eye(sxx.shape[0], dtype=sxx.dtype), sxy).float()
        self.mu_x, self.mu_y = self.mu_x.float(), self.mu_y.float()

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        return self.mu_y + (x - self.mu_x) @ self.beta

    @torch.no_grad()
    def held_out(self, documents: list[str]) -> tuple[float, float]:
        """R^2 of the embeddings and the nearest-token accuracy over the whole vocabulary."""
        vocabulary = torch.nn.functional.normalize(self.embed.weight.float(), dim=-1)
        errors, targets, hits, total = 0.0, [], 0, 0
        for document in documents:
            x, y, ids = self.pairs(document)
            predicted = self.translate(x)
            errors += float((predicted - y).pow(2).sum())
            targets.append(y)
            nearest = (torch.nn.functional.normalize(predicted, dim=-1) @ vocabulary.T).argmax(-1)
            hits, total = hits + int((nearest == ids).sum()), total + len(ids)
        y = torch.cat(targets)
        return 1 - errors / float((y - y.mean(0)).pow(2).sum()), hits / total

    @torch.no_grad()
    def answer(self, sample, rung: str, other=None) -> tuple[float, float]:
        """EM and contains-answer of one rung on one sample (greedy, 8 new tokens)."""
        prompt = question_prompt(sample.question)
        layout = slot_layout(self.r_tok, prompt, sample.receiver_context)
        source = other or sample
        doc = read_as_sharer(self.s_model, self.s_tok, source.sharer_context, source.question)
        chosen = top_sentences(doc.scores, doc.spans, doc.text, 32)  # sharer positions
        r_ids, r_spans = document_ids(self.r_tok, source.sharer_context)
        alignment = align_spans(doc.spans, r_spans)
        selected = torch.zeros(doc.spans.shape[0], dtype=torch.bool)
        selected[chosen] = True
        rows = (alignment.weights[:, selected] > 0).any(dim=1)  # receiver tokens of those sentences
        if rung == "own-emb":
            inputs = self.embed(r_ids[:, rows])
        else:
            inputs = self.translate(alignment.apply(sharer_features(doc.captured))[rows])[None]
        cache = prefill(self.r_model, layout.head_ids)
        positions = torch.arange(layout.head_tokens, layout.head_tokens + inputs.shape[1])[None]
        self.r_model.model(
            inputs_embeds=inputs, past_key_values=cache, position_ids=positions, use_cache=True
        )
        input_ids = finish_input(self.r_model, self.r_tok, layout, cache, inputs.shape[1])
        text = generate_text(self.r_model, self.r_tok, input_ids, cache, GenerationSettings(max_new_tokens=8))
        return exact_match(extract_answer(text), sample.answers), contains_answer(text, sample.answers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=600, help="corpus documents to fit on")
    parser.add_argument("--n", type=int, default=60, help="held-out facts-cross test samples")
    args = parser.parse_args()
    started = time.perf_counter()
    probe = Probe()
    corpus = alignment_corpus(args.documents + 100, seed=0)
    probe.fit(corpus[: args.documents])
    r2, nearest = probe.held_out(corpus[args.documents :])
    print(f"held-out (100 documents): embedding R^2 {r2:.3f}, nearest token correct {nearest:.3f}")
    samples = get_task("facts-cross").samples("test", args.n, seed=0)
    scores: dict[str, list[tuple[float, float]]] = {"own-emb": [], "soft": [], "soft-wrong": []}
    for index, sample in enumerate(samples):
        other = samples[(index + 1) % len(samples)]
        scores["own-emb"].append(probe.answer(sample, "own-emb"))
        scores["soft"].append(probe.answer(sample, "soft"))
        scores["soft-wrong"].append(probe.answer(sample, "soft", other=other))
    for rung, got in scores.items():
        em, contains = statistics.fmean(g[0] for g in got), statistics.fmean(g[1] for g in got)
        print(f"{rung:11s} n={len(got)}  EM {em:.3f}  contains {contains:.3f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
