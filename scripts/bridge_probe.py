"""Experiment: a soft-token bridge from SmolLM2 into the trained Gemma3 -> Gemma3 LCF-X adapter.

Across families the per-token KV translation is unreadable, and soft tokens placed straight
into Gemma3's input are too (docs/lcfx.md, section 5). But Gemma3 -> Gemma3 LCF-X works
(0.71 EM) because task training taught its span decoder to write a prefix the receiver can
answer from, starting from the receiver's *own* K/V of the selected sentences. This probe
composes the two:

    SmolLM2 reads its document, its question attention picks sentences (<= 32 tokens)
    -> ridge map of SmolLM2's K/V (layers 0-3) to Gemma3 input embeddings ("soft tokens")
    -> Gemma3 reads [BOS + soft tokens] as a sharer would read a document  -> Gemma3 K/V
    -> the shipped gemma3-to-gemma3-lcfx span encoder + decoder           -> the packet
    -> placed where the document would sit in the receiver's input, as LCF-X does

Nothing new is trained. Rungs on held-out facts-cross test samples (greedy, 8 new tokens):
    own-emb      Gemma3's own token embeddings of the sentences SmolLM2 selected (the ceiling)
    soft         the translated embeddings
    soft-wrong   translated, from another sample's document (a control)

    python scripts/bridge_probe.py [--documents 600] [--n 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from soft_token_probe import Probe, sharer_features  # scripts/ is on sys.path when run as a script
from tqdm import tqdm

from lcflow.adapter import LatentAdapter
from lcflow.align import align_spans
from lcflow.crosscontext.corpus import alignment_corpus
from lcflow.crosscontext.oracles import read_as_sharer
from lcflow.crosscontext.placement import document_ids, finish_input, slot_cache, slot_layout
from lcflow.crosscontext.selection import question_attention, question_ids, top_sentences
from lcflow.handoff import GenerationSettings, generate_text
from lcflow.kv import RopeCodec, capture_kv, full_cache, prefill
from lcflow.metrics import contains_answer, exact_match, extract_answer
from lcflow.prompting import tokenize_context
from lcflow.tasks import get_task, question_prompt


class Bridge(Probe):
    def __init__(self, adapter_dir: str, slots: int, heads: list[tuple[int, int]] | None = None):
        super().__init__()
        self.heads = heads
        self.adapter = LatentAdapter.from_pretrained(adapter_dir).float().eval()
        self.rope = RopeCodec(self.r_model)
        self.slots = slots

    def fit_and_train(self, documents: list[str], steps: int, batch: int = 512, lr: float = 1e-3) -> None:
        """The ridge map, then (steps > 0) a residual MLP on top, trained with a dense per-token
        signal: cross-entropy of the soft token against Gemma3's embeddings of the training
        tokens' vocabulary (cosine logits, learned temperature) plus the embedding MSE."""
        with torch.no_grad():
            data = [self.pairs(d) for d in tqdm(documents, desc="pairs", leave=False)]
        x, y, ids = (torch.cat(part) for part in zip(*data, strict=True))
        self.fit_from(x, y)
        self.residual = None
        if steps <= 0:
            return
        vocab, target = ids.unique(return_inverse=True)
        table = torch.nn.functional.normalize(self.embed(vocab).detach().float(), dim=-1)
        self.sd_x = x.std(0) + 1e-6
        self.residual = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], 1024), torch.nn.GELU(), torch.nn.Linear(1024, y.shape[1])
        )
        torch.nn.init.zeros_(self.residual[2].weight)
        torch.nn.init.zeros_(self.residual[2].bias)
        log_tau = torch.nn.Parameter(torch.tensor(3.0))
        optimizer = torch.optim.AdamW([*self.residual.parameters(), log_tau], lr=lr, weight_decay=0.01)
        y_var = float(y.var(0).sum())
        generator = torch.Generator().manual_seed(0)
        progress = tqdm(range(steps), desc="train map", leave=False)
        for step in progress:
            pick = torch.randint(0, len(x), (batch,), generator=generator)
            predicted = self.translate(x[pick])
            logits = log_tau.exp() * torch.nn.functional.normalize(predicted, dim=-1) @ table.T
            ce = torch.nn.functional.cross_entropy(logits, target[pick])
            mse = (predicted - y[pick]).pow(2).sum(-1).mean() / y_var
            loss = ce + mse
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0:
                progress.set_postfix(ce=f"{ce.item():.3f}", mse=f"{mse.item():.3f}")

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        base = super().translate(x)
        if getattr(self, "residual", None) is None:
            return base
        return base + self.residual((x - self.mu_x) / self.sd_x)

    @torch.no_grad()
    def inputs(self, sample, rung: str, source) -> torch.Tensor:
        """[1, rows, 640]: the receiver-space input vectors of the sentences SmolLM2 selects."""
        doc = read_as_sharer(self.s_model, self.s_tok, source.sharer_context, sample.question)
        scores = doc.scores
        if self.heads:  # SmolLM2's retrieval heads (scripts/retrieval_heads_probe.py)
            cache = prefill(
                self.s_model, tokenize_context(self.s_tok, source.sharer_context)[0], full_cache()
            )
            prompt = question_ids(self.s_tok, question_prompt(sample.question))
            scores = question_attention(self.s_model, cache, prompt, cache.get_seq_length(), heads=self.heads)
        chosen = top_sentences(scores, doc.spans, doc.text, self.slots, per_token=True)
        r_ids, r_spans = document_ids(self.r_tok, source.sharer_context)
        alignment = align_spans(doc.spans, r_spans)
        selected = torch.zeros(doc.spans.shape[0], dtype=torch.bool)
        selected[chosen] = True
        rows = (alignment.weights[:, selected] > 0).any(dim=1)
        if rung == "own-emb":
            return self.embed(r_ids[:, rows])
        return self.translate(alignment.apply(sharer_features(doc.captured))[rows])[None]

    @torch.no_grad()
    def packet(self, inputs: torch.Tensor):
        """Gemma3 reads [BOS + inputs] as a sharer; the span adapter turns that K/V into entries."""
        bos = self.embed(torch.tensor([[self.r_tok.bos_token_id]]))
        cache = full_cache()
        self.r_model.model(
            inputs_embeds=torch.cat([bos, inputs], dim=1), past_key_values=cache, use_cache=True
        )
        captured = capture_kv(self.r_model, cache)
        rows = torch.arange(1, captured.num_tokens)
        latents = {
            t: self.adapter.encoder.encode_layer(captured, t, rows) for t in self.adapter.encoder.layers
        }
        return self.adapter.decoder.entries(latents)

    @torch.no_grad()
    def answer_with(self, sample, rung: str, other=None) -> tuple[float, float]:
        keys, values = self.packet(self.inputs(sample, rung, other or sample))
        layout = slot_layout(self.r_tok, question_prompt(sample.question), sample.receiver_context)
        cache = slot_cache(self.r_model, self.rope, layout, keys, values)
        input_ids = finish_input(self.r_model, self.r_tok, layout, cache, keys[0].shape[2])
        text = generate_text(self.r_model, self.r_tok, input_ids, cache, GenerationSettings(max_new_tokens=8))
        return exact_match(extract_answer(text), sample.answers), contains_answer(text, sample.answers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=600, help="corpus documents to fit the ridge map on")
    parser.add_argument("--n", type=int, default=60, help="held-out test samples")
    parser.add_argument("--task", default="facts-cross", help="task to evaluate on (test split)")
    parser.add_argument(
        "--adapter", default="adapters/gemma3-to-gemma3-lcfx", help="Gemma3 -> Gemma3 span adapter"
    )
    parser.add_argument("--slots", type=int, default=32, help="sharer tokens selected")
    parser.add_argument(
        "--heads", help="JSON from retrieval_heads_probe.py: select with its best --top heads"
    )
    parser.add_argument("--top", type=int, default=1, help="how many of the ranked heads to average")
    parser.add_argument("--rungs", default="own-emb,soft,soft-wrong", help="comma-separated rungs")
    parser.add_argument("--train-steps", type=int, default=0, help="train a residual map on top of ridge")
    args = parser.parse_args()
    started = time.perf_counter()
    heads = None
    if args.heads:
        with open(args.heads) as f:
            heads = [(layer, head) for _, layer, head in json.load(f)["ranked"][: args.top]]
    bridge = Bridge(args.adapter, args.slots, heads)
    rungs = args.rungs.split(",")
    if any(r.startswith("soft") for r in rungs):
        corpus = alignment_corpus(args.documents + 100, seed=0)
        bridge.fit_and_train(corpus[: args.documents], args.train_steps)
        with torch.no_grad():
            r2, nearest = bridge.held_out(corpus[args.documents :])
        print(
            f"held-out (100 documents): embedding R^2 {r2:.3f}, nearest token correct {nearest:.3f}",
            flush=True,
        )
    samples = get_task(args.task).samples("test", args.n, seed=0)
    scores: dict[str, list[tuple[float, float]]] = {r: [] for r in rungs}
    for index, sample in enumerate(samples):
        other = samples[(index + 1) % len(samples)]
        for rung in rungs:
            if rung == "soft-wrong":
                scores[rung].append(bridge.answer_with(sample, "soft", other=other))
            else:
                scores[rung].append(bridge.answer_with(sample, rung))
        if (index + 1) % 10 == 0:
            partial = {r: round(statistics.fmean(g[0] for g in got), 3) for r, got in scores.items()}
            print(f"{index + 1}/{len(samples)} EM so far {partial}", flush=True)
    for rung, got in scores.items():
        em, contains = statistics.fmean(g[0] for g in got), statistics.fmean(g[1] for g in got)
        print(f"{rung:11s} n={len(got)}  EM {em:.3f}  contains {contains:.3f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
