"""Experiment: the rungs of a bridge adapter (lcflow.adapter.bridge), to see where EM is lost.

A bridge adapter sends the sentences the sharer selects as soft tokens in the receiver's input
space, which the receiver reads with its own model and a receiver -> receiver span adapter (the
reader). Each rung below changes one thing; all use the adapter's own selection (its sharer's
retrieval heads) on held-out test samples, greedy, 8 new tokens:

    own-direct   the receiver's own token embeddings of the selected sentences, placed where the
                 document would sit in its input (no reader)
    soft-direct  the translated soft tokens, placed the same way (no reader)
    own-emb      the receiver's own embeddings, through the reader: the ceiling of the bridge
    soft         the translated soft tokens through the reader: the product's LCF-X bridge packet
    soft-wrong   `soft` made from another sample's document (a control)
    soft-snap    each soft token replaced by its nearest receiver vocabulary embedding (cosine),
                 on the receiver's side: what is left of `soft`'s loss once the receiver snaps

    lcflow bridge --sharer smollm2-135m-instruct --reader adapters/gemma3-to-gemma3-lcfx --out DIR
    python -m lcflow.research.bridge_probe --adapter DIR [--n 60] [--task facts-cross | --task-file F.jsonl]
        [--rungs own-emb,soft]

(The ridge-only translator of docs/lcfx.md's "soft tokens" rung is `lcflow bridge --steps 0`.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lcflow.adapter import LatentAdapter
from lcflow.adapter.bridge import INPUT_LAYER, snap_to_vocabulary
from lcflow.core.kv import prefill
from lcflow.eval.metrics import contains_answer, exact_match, extract_answer
from lcflow.handoff.generation import GenerationSettings, generate_text
from lcflow.handoff.pair import Latents, Receiver, Sharer
from lcflow.packets.placement import finish_input, slot_layout
from lcflow.provision.loading import load_model_and_tokenizer
from lcflow.tasks import get_task, load_task_file, question_prompt

RUNGS = ("own-direct", "soft-direct", "own-emb", "soft", "soft-wrong", "soft-snap")


class Probe:
    def __init__(self, adapter_dir: str):
        self.adapter = LatentAdapter.from_pretrained(adapter_dir).eval()
        sharer = load_model_and_tokenizer(self.adapter.config.sharer.name, "cpu")
        receiver = load_model_and_tokenizer(self.adapter.config.receiver.name, "cpu")
        self.adapter.encoder.attach_receiver_tokenizer(receiver[1])
        self.sharer = Sharer(*sharer, self.adapter.encoder, self.adapter.config)
        self.receiver = Receiver(*receiver, self.adapter.decoder, self.adapter.config)

    @torch.no_grad()
    def inputs(self, sample, own: bool, source) -> torch.Tensor:
        """[1, rows, hidden]: the selected sentences of `source`'s document, for `sample`'s question."""
        prompt = question_prompt(sample.question)
        context = self.sharer.prefill(source.sharer_context)
        positions = self.sharer.select(context, question=prompt)
        if not own:
            return self.sharer.encode(context, question=prompt, positions=positions).layers[INPUT_LAYER]
        _, receiver_ids = self.adapter.encoder.alignment(context.text, context.spans)
        _, rows = self.adapter.encoder.receiver_rows(context.text, context.spans, positions)
        return self.receiver.model.get_input_embeddings()(receiver_ids[:, rows])

    @torch.no_grad()
    def answer(self, sample, rung: str, other=None) -> tuple[float, float]:
        prompt = question_prompt(sample.question)
        inputs = self.inputs(sample, rung.startswith("own"), other if rung == "soft-wrong" else sample)
        if rung == "soft-snap":
            inputs = snap_to_vocabulary(self.receiver.model.get_input_embeddings(), inputs)
        if rung.endswith("direct"):
            text = self.read_directly(prompt, inputs, sample.receiver_context)
        else:
            latents = Latents("lcfx", {INPUT_LAYER: inputs})
            prepared = self.receiver.prepare(
                "lcfx", prompt, latents, receiver_context=sample.receiver_context
            )
            text = self.receiver.generate(prepared, GenerationSettings(max_new_tokens=8))
        return exact_match(extract_answer(text), sample.answers), contains_answer(text, sample.answers)

    def read_directly(self, prompt: str, inputs: torch.Tensor, receiver_context: str) -> str:
        """`inputs` as the receiver's input vectors where the document would sit (no reader)."""
        model, tokenizer = self.receiver.model, self.receiver.tokenizer
        layout = slot_layout(tokenizer, prompt, receiver_context)
        cache = prefill(model, layout.head_ids)
        positions = torch.arange(layout.head_tokens, layout.head_tokens + inputs.shape[1])[None]
        model.model(inputs_embeds=inputs, past_key_values=cache, position_ids=positions, use_cache=True)
        input_ids = finish_input(model, tokenizer, layout, cache, inputs.shape[1])
        return generate_text(model, tokenizer, input_ids, cache, GenerationSettings(max_new_tokens=8))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="a bridge adapter directory (`lcflow bridge`)")
    parser.add_argument("--n", type=int, default=60, help="held-out test samples")
    parser.add_argument("--task", default="facts-cross", help="task to evaluate on (test split)")
    parser.add_argument(
        "--task-file", help="a JSONL task file instead of --task (e.g. the unseen ships family)"
    )
    parser.add_argument("--rungs", default=",".join(RUNGS), help=f"comma-separated, from {RUNGS}")
    args = parser.parse_args()
    rungs = args.rungs.split(",")
    unknown = sorted(set(rungs) - set(RUNGS))
    if unknown:
        parser.error(f"unknown rungs {unknown}; choose from {RUNGS}")
    started = time.perf_counter()
    probe = Probe(args.adapter)
    if args.task_file:
        samples = load_task_file(args.task_file)[: args.n]
    else:
        samples = get_task(args.task).samples("test", args.n, seed=0)
    scores: dict[str, list[tuple[float, float]]] = {r: [] for r in rungs}
    for index, sample in enumerate(samples):
        other = samples[(index + 1) % len(samples)]
        for rung in rungs:
            scores[rung].append(probe.answer(sample, rung, other))
        if (index + 1) % 10 == 0:
            partial = {r: round(statistics.fmean(g[0] for g in got), 3) for r, got in scores.items()}
            print(f"{index + 1}/{len(samples)} EM so far {partial}", flush=True)
    for rung, got in scores.items():
        em, contains = statistics.fmean(g[0] for g in got), statistics.fmean(g[1] for g in got)
        print(f"{rung:11s} n={len(got)}  EM {em:.3f}  contains {contains:.3f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
