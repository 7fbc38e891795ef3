"""Experiment: does a packet of *contextual* K/V carry more than the same sentences as text,
once the model that writes the K/V is as trained as the text reader?

LCF-X's packet holds the sharer's K/V at the selected positions, computed with the whole
document in view; `forward-selected` sends those positions' sentences as text, which the
receiver re-reads without the rest. On the referent family ("The latter grows lilies.") the
context is what says whose fact a sentence states, yet a text reader beats every trained
packet (docs/measurements.md). One asymmetry: the text reader's LoRA re-encodes the forwarded
sentences (it changes the K/V the question reads), while the packet's K/V come from a frozen
sharer, and a receiver-side LoRA only changes how the question reads them. This probe gives the
packet a reader's LoRA on *both* sides (one model, so one LoRA writes and reads the packet), the
same selection for every arm:

    text        forward-selected + text reader    the rival: reader(selected sentences)
    local       the selected sentences as a packet packet reader(question | K/V it computed over
                                                  the selected sentences alone, every token)
    plain       identity packet, plain sharer     packet reader(question | plain sharer's K/V)
    contextual  identity packet, LoRA'd sharer    packet reader(question | K/V the packet reader
                                                  computed over the whole document, selected)

The identity packet is the exact map (lcflow.packets.alignment.identity_alignment) with the
LCF-X adapter's selection (head, budget): the receiver gets the K/V rows themselves.
`contextual` minus `text` is what the document's context adds to the same positions when both
are encoded by equally trained weights; `local` splits it in two: the packet's own way of
arriving (rows placed where a document sits, RoPE re-applied: local minus text, with one LoRA)
and the context itself (contextual minus local). The output's samples pair with `lcflow eval` runs
(scripts/pair_runs.py --method contextual OUT.json BASE.json).

`train` refines the packet reader's LoRA through contextual packets with the text reader's
recipe (lcflow.training.reader: the same samples in the same order, steps, batch, learning rate,
schedule and loss, CE + kl_weight * KL to the plain receiver reading the document), so that it
can be set against a text reader refined alike (`lcflow train --mode text-reader --init-reader`):

    python -m lcflow.research.contextual_packet eval --task facts-referents --n 200 --out probe.json
    python -m lcflow.research.contextual_packet train --task facts-referents-words --steps 40 --out DIR
    python -m lcflow.research.contextual_packet eval --packet-reader DIR --reader TEXT_READER ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from lcflow.adapter import LatentAdapter
from lcflow.adapter.reader import TextReader
from lcflow.core.kv import capture_kv, full_cache, kv_spec, run_backbone
from lcflow.core.prompting import tokenize_context
from lcflow.eval.metrics import contains_answer, exact_match, extract_answer
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.pair import Receiver, Sharer, SharerContext, reader_contexts, receiver_view
from lcflow.packets.alignment import identity_alignment
from lcflow.provision.loading import load_model_and_tokenizer
from lcflow.tasks import format_question_prompt, get_task, load_task_file
from lcflow.tasks.prompts import SHORT_ANSWER_TOKENS
from lcflow.training.distill import answer_logits
from lcflow.training.lcfx_recipe import span_adapter_from_alignment
from lcflow.training.reader import answer_logits_from_text
from lcflow.training.train import answer_ids, cosine_with_warmup

ARMS = ("text", "local", "plain", "contextual")
SELECTION_FIELDS = ("slots", "selection", "selection_heads", "selection_chunk")
STATE_FILE = "state.pt"


def identity_packet_adapter(selection_adapter: str, model, tokenizer, name: str) -> LatentAdapter:
    """The exact map for `model` on both sides, selecting as `selection_adapter` does."""
    chosen = LatentAdapter.from_pretrained(selection_adapter).config
    adapter = span_adapter_from_alignment(
        identity_alignment(kv_spec(model.config)),
        (model, tokenizer),
        (model, tokenizer),
        (name, name),
        chosen.layer_map_strategy,
        chosen.slots,
        chosen.selection,
    )
    for field in SELECTION_FIELDS:
        setattr(adapter.config, field, getattr(chosen, field))
    return adapter.to(model.device).eval().requires_grad_(False)


def written_latents(model, tokenizer, adapter, text: str, prompt: str, positions):
    """The packet `model` writes: its K/V of `text` (as a sharer's context) at `positions`, with
    gradients when they are enabled (Sharer.prefill runs without)."""
    ids, spans = tokenize_context(tokenizer, text)
    cache = full_cache()
    run_backbone(model, ids, cache)
    context = SharerContext(text, ids, spans, capture_kv(model, cache), 0.0)
    if positions is None:  # every token after BOS
        positions = torch.arange(1, ids.shape[1])
    sharer = Sharer(model, tokenizer, adapter.encoder, adapter.config)
    return sharer.encode(context, question=prompt, positions=positions)


def packet_prepared(model, tokenizer, adapter, latents, sample, prompt: str):
    """The receiver's cache with `latents` where a document would sit, read by `model`."""
    # A fresh receiver per sample: a Receiver caches its template head's K/V, stale once the LoRA moves.
    receiver = Receiver(model, tokenizer, adapter.decoder, adapter.config)
    return receiver.prepare_lcfx(latents, prompt, sample.receiver_context)


def contextual_prepared(model, tokenizer, adapter, sample, prompt: str, positions):
    """The receiver's cache when `model` both writes the packet (its K/V of the whole document,
    at `positions`) and reads it."""
    latents = written_latents(model, tokenizer, adapter, sample.sharer_context, prompt, positions)
    return packet_prepared(model, tokenizer, adapter, latents, sample, prompt)


# --- eval ------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(args) -> dict:
    model, tokenizer = load_model_and_tokenizer(args.model)
    text_reader = TextReader.from_pretrained(args.reader, model, tokenizer, name=args.model).model
    packet_reader = (
        TextReader.from_pretrained(args.packet_reader, model, tokenizer, name=args.model).model
        if args.packet_reader
        else text_reader
    )
    adapter = identity_packet_adapter(args.selection_adapter, model, tokenizer, args.model)
    selector = Sharer(model, tokenizer, adapter.encoder, adapter.config)  # the plain sharer selects
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.task_file:  # a task file's first n, as `lcflow eval --task-file` takes them
        samples = load_task_file(args.task_file)[: args.n]
    else:
        samples = get_task(args.task).samples(args.split, args.n, seed=args.seed)
    rows = []
    for sample in tqdm(samples, desc="contextual packet", unit="sample"):
        prompt = format_question_prompt(sample, include_context=False)
        context = selector.prefill(sample.sharer_context)
        positions = selector.select(context, receiver_view(sample.receiver_context, prompt), prompt)
        forwarded = selector.selected_text(context, prompt, positions)
        text = Receiver(text_reader, tokenizer)
        plain = selector.encode(context, question=prompt, positions=positions)
        packet = Receiver(packet_reader, tokenizer, adapter.decoder, adapter.config)
        prepared = {
            "text": text.prepare_plain(prompt, reader_contexts(forwarded, sample.receiver_context)),
            "local": packet_prepared(
                packet_reader,
                tokenizer,
                adapter,
                written_latents(packet_reader, tokenizer, adapter, forwarded, prompt, None),
                sample,
                prompt,
            ),
            "plain": packet.prepare_lcfx(plain, prompt, sample.receiver_context),
            "contextual": contextual_prepared(packet_reader, tokenizer, adapter, sample, prompt, positions),
        }
        for arm in ARMS:
            generated = (text if arm == "text" else packet).generate(prepared[arm], settings)
            prediction = extract_answer(generated)
            rows.append(
                {
                    "sample_id": sample.id,
                    "method": arm,
                    "prediction": prediction,
                    "generated": generated,
                    "em": exact_match(prediction, sample.answers),
                    "contains": contains_answer(generated, sample.answers),
                }
            )
    summary = {
        arm: {
            score: sum(r[score] for r in rows if r["method"] == arm) / len(samples)
            for score in ("em", "contains")
        }
        for arm in ARMS
    }
    return {"meta": vars(args), "summary": summary, "samples": rows}


# --- train -----------------------------------------------------------------------------------


def train(args) -> dict:
    """Refine the packet reader's LoRA through contextual packets, checkpointed every 5 steps."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.requires_grad_(False)
    reader = TextReader.from_pretrained(args.init_reader, model, tokenizer, name=args.model, merge=False)
    reader.config.channel = "lcfx"  # it now reads (and writes) packets
    adapter = identity_packet_adapter(args.selection_adapter, model, tokenizer, args.model)
    selector = Sharer(model, tokenizer, adapter.encoder, adapter.config)
    teacher = Receiver(model, tokenizer)
    samples = get_task(args.task).samples("train", args.steps * args.batch_size, seed=args.seed)
    optimizer = torch.optim.AdamW(list(reader.parameters()), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, int(0.1 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, args.steps, warmup)
    )
    step, losses = 0, []
    if (out / "checkpoint" / STATE_FILE).is_file():
        state = torch.load(out / "checkpoint" / STATE_FILE, weights_only=True)
        reader.load_weights(out / "checkpoint")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = state["step"], state["losses"]
    bar = tqdm(total=args.steps, initial=step, desc="train contextual packet", unit="step")
    while step < args.steps:
        reader.train()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for sample in samples[step * args.batch_size : (step + 1) * args.batch_size]:
            loss = sample_loss(reader.model, tokenizer, adapter, selector, teacher, sample, args.kl_weight)
            (loss / args.batch_size).backward()
            total += loss.item() / args.batch_size
        torch.nn.utils.clip_grad_norm_(list(reader.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(total)
        bar.set_postfix(loss=f"{total:.3f}")
        bar.update(1)
        if step % 5 == 0 or step == args.steps:
            reader.save_pretrained(out / "checkpoint", dtype=torch.float32)
            state = {"step": step, "losses": losses}
            state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            torch.save(state, out / "checkpoint" / (STATE_FILE + ".tmp"))
            (out / "checkpoint" / (STATE_FILE + ".tmp")).replace(out / "checkpoint" / STATE_FILE)
    bar.close()
    reader.config.training = {**vars(args), "losses": losses}
    reader.save_pretrained(out, dtype=torch.bfloat16)  # as the shipped readers
    return {"losses": losses}


def sample_loss(model, tokenizer, adapter, selector, teacher, sample, kl_weight: float) -> torch.Tensor:
    """CE(answer | contextual packet) + kl_weight * KL(plain receiver reading the document || it)."""
    prompt = format_question_prompt(sample, include_context=False)
    target = answer_ids(tokenizer, sample.answers[0]).to(model.device)
    with torch.no_grad():  # the selection runs on the frozen sharer, as in the text reader's training
        context = selector.prefill(sample.sharer_context)
        positions = selector.select(context, question=prompt)
    student = answer_logits(
        model, contextual_prepared(model, tokenizer, adapter, sample, prompt, positions), target
    )
    loss = F.cross_entropy(student, target)
    if kl_weight > 0:
        with torch.no_grad():
            document = [sample.sharer_context, sample.receiver_context]
            reference = answer_logits_from_text(teacher.model, tokenizer, prompt, document, target)
        kl = F.kl_div(
            student.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        loss = loss + kl_weight * kl
    return loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_eval = commands.add_parser("eval", help="score the three arms on the same samples")
    run_train = commands.add_parser("train", help="refine the packet reader through contextual packets")
    for sub in (run_eval, run_train):
        sub.add_argument("--model", default="gemma3-270m", help="one model on both sides")
        sub.add_argument(
            "--selection-adapter",
            default="adapters/gemma3-to-gemma3-lcfx-general",
            help="the LCF-X adapter whose selection (head, budget) every arm uses",
        )
        sub.add_argument("--seed", type=int, default=0, help="sample draw (and generation) seed")
        sub.add_argument("--out", required=True, help="eval: the JSON to write; train: the LoRA's directory")
    run_eval.add_argument(
        "--reader",
        default="adapters/gemma3-to-gemma3-reader-general",
        help="the text reader (forward-selected); also the packet reader unless --packet-reader",
    )
    run_eval.add_argument("--packet-reader", default="", help="a LoRA from `train` for the packet arms")
    run_eval.add_argument("--task", default="facts-referents", help="task family")
    run_eval.add_argument(
        "--task-file",
        default="",
        help="a JSONL of samples instead of --task (e.g. lcflow/data/tasks/ships-referents.jsonl)",
    )
    run_eval.add_argument("--split", default="test", help="split to draw from")
    run_eval.add_argument("--n", type=int, default=200, help="samples")
    run_eval.add_argument(
        "--max-new-tokens", type=int, default=SHORT_ANSWER_TOKENS, help="answer length cap, as lcflow eval"
    )
    run_train.add_argument(
        "--init-reader", default="adapters/gemma3-to-gemma3-reader-general", help="the LoRA to start from"
    )
    run_train.add_argument("--task", default="facts-referents-words", help="training task (train split)")
    run_train.add_argument("--steps", type=int, default=40, help="optimizer steps")
    run_train.add_argument("--batch-size", type=int, default=16, help="samples per step")
    run_train.add_argument("--lr", type=float, default=2e-4, help="AdamW lr (10%% warm-up, cosine decay)")
    run_train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    run_train.add_argument(
        "--kl-weight", type=float, default=0.25, help="weight of the KL to the document reader"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    if args.command == "train":
        result = {"meta": vars(args), **train(args)}
        destination = Path(args.out) / "train_log.json"
    else:
        result = evaluate(args)
        destination = Path(args.out)
        print(json.dumps(result["summary"], indent=1))
    result["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    result["meta"]["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    destination.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
