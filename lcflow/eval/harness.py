"""One harness, all methods, the same samples.

Methods (what the receiver gets before answering the question):

    receiver      its own context only (same-context tasks: the document)
    sharer        the sharer model answers alone from its own context (a reference, not a handoff)
    forward       the sharer's document forwarded as text, read with the receiver's own context
                  (named `skyline` before: on same-context tasks it is the document, once)
    text          the note: the sharer writes one sentence for the receiver (lcflow.core.prompting: a
                  chat instruction, or a few-shot prompt for a base model; <= 64 tokens)
    text-c2c      the note in C2C's wording and budget (256 tokens), for comparisons with the papers
    forward-selected
                  the whole sentences holding the positions the lcfx adapter's packet would carry
                  (its selection head, this question, its budget), forwarded as text; no latents
    forward+reader, forward-selected+reader
                  those two channels read by a text reader (lcflow.adapter.reader: a LoRA on the
                  receiver trained with LCF-X's data, steps and loss), the control LCF-X must beat
    c2c           the C2C baseline fuser (same-context tasks only)
    kvcomm        KVComm, training-free (same-model pairs only): the sharer's KV of the document as
                  the receiver's prefix in the layers its attention rule chose, only the attention
                  sink in the others (lcflow.handoff.kvcomm)
    lcf           LCF latents fused onto the shared context (same-context tasks only)
    lcfx          LCF-X packet (any task)
    lcfx-pruned   the same with a pruned adapter
    lcfx-wrong    a control: the lcfx adapter, but the packet another sample's sharer would send
                  (its document, its question); must score clearly below lcfx

Each sample's stages are timed in-process (milliseconds): sharer prefill, message
generation (text), selection, encode, receiver prefill (with decoding into KV), time to the first
answer token, total. Transfer time needs the services: see lcflow.commands.eval --services.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from lcflow.core.errors import UsageError
from lcflow.core.names import LCFX_METHODS, METHODS, NOTE_METHODS, READER_METHODS, SAME_CONTEXT_ONLY
from lcflow.eval.metrics import (
    contains_answer,
    exact_match,
    extract_answer,
    facts_stated,
    mean_with_ci,
    token_f1,
)
from lcflow.handoff.c2c import c2c_prepare
from lcflow.handoff.generation import GenerationSettings
from lcflow.handoff.kvcomm import kvcomm_input, prepare_receiver, send_layers, sharer_prefix
from lcflow.handoff.pair import Receiver, Sharer, reader_contexts, receiver_view, text_contexts
from lcflow.tasks import QASample, format_question_prompt
from lcflow.transport.quantize import Quantization
from lcflow.transport.segments import TensorSpec

WIRE_BYTES_PER_LATENT = 2  # latents travel as bfloat16


@dataclass
class EvalModels:
    """The loaded pair and whichever adapters the requested methods need (keyed by method)."""

    sharer: tuple  # (model, tokenizer)
    receiver: tuple
    # "lcf" / "lcfx" / "lcfx-pruned" -> LatentAdapter, "c2c" -> fuser, "forward+reader" /
    # "forward-selected+reader" -> TextReader (forward-selected selects with "lcfx"'s adapter)
    adapters: dict = field(default_factory=dict)
    # LCF-X methods whose span adapter carries a receiver-side LoRA (`lcflow train --receiver-lora`):
    # the receiver model, LoRA merged, that reads their packet
    packet_readers: dict = field(default_factory=dict)
    wire: str = "exact"  # the latents' number format on the way to the receiver (names.WIRE_FORMS)
    kvcomm_layers: frozenset[int] = frozenset()  # the layers KVComm sends whole (its calibration)


def through_the_wire(latents, wire: str) -> int:
    """Put `latents`' layers through the wire's number format in place, as the services would
    send them ("bf16": rounded to bfloat16; "int8" / "int4": bf16, then the sharer's quantizer and
    the receiver's dequantizer); returns the bytes those tensors take on the wire ("exact": the
    layers are left as encoded, counted as bf16)."""

    if wire == "exact":
        return sum(z.numel() for z in latents.layers.values()) * WIRE_BYTES_PER_LATENT
    sent = 0
    for layer, z in latents.layers.items():
        rounded = z.to(torch.bfloat16)
        if wire == "bf16":
            latents.layers[layer], sent = rounded.to(z.dtype), sent + rounded.numel() * 2
            continue
        codec = Quantization.named(wire)
        problem = codec.row_problem(rounded.shape[-1])
        if problem:
            raise UsageError(
                f"--wire {wire} cannot carry this adapter's packet rows of {rounded.shape[-1]} numbers ({problem}): "
                f"use --wire {codec.fitting_name(rounded.shape[-1])} or bf16"
            )
        blob = codec.encode({"z": rounded})
        sent += sum(t.numel() * t.element_size() for t in blob.values())
        decoded = codec.decode(blob, {"z": TensorSpec.of(rounded)}, z.device)["z"]
        latents.layers[layer] = decoded.to(z.dtype)
    return sent


@dataclass
class SampleOutcome:
    method: str
    sample_id: str
    prediction: str
    generated: str
    em: float
    f1: float
    bytes_sent: int
    contains: float  # the answer's first line contains an accepted answer (lcflow.eval.metrics)
    timings_ms: dict[str, float]
    empty: bool = False  # nothing but whitespace generated
    # An open prompt (QASample.open_ended): the share of the document's facts the answer states.
    facts_stated: float | None = None


class _Clock:
    """Stage timer: `clock.stage(name)` closes the previous stage; the first streamed token is noted."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def stage(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + (now - self.last) * 1000
        self.last = now

    def first_token(self) -> None:
        self.timings.setdefault("time_to_first_token", (time.perf_counter() - self.start) * 1000)

    def add(self, timings: dict[str, float]) -> None:
        """Stages another component timed itself (they happened since the last stage closed)."""
        for name, ms in timings.items():
            self.timings[name] = self.timings.get(name, 0.0) + ms
        self.last = time.perf_counter()

    def finish(self) -> dict[str, float]:
        self.timings["total"] = (time.perf_counter() - self.start) * 1000
        return self.timings


def _contexts(*texts: str) -> list[str]:
    """Distinct non-empty contexts in order (a same-context task's document appears once)."""
    out: list[str] = []
    for text in texts:
        if text and text not in out:
            out.append(text)
    return out


def _halves(models: EvalModels, method: str) -> tuple[Sharer, Receiver]:
    adapter = models.adapters.get(method) if method in ("lcf", *LCFX_METHODS) else None
    encoder = adapter.encoder if adapter is not None else None
    decoder = adapter.decoder if adapter is not None else None
    config = adapter.config if adapter is not None else None
    receiver_model = models.packet_readers.get(method, models.receiver[0])
    return Sharer(*models.sharer, encoder, config), Receiver(
        receiver_model, models.receiver[1], decoder, config
    )


@torch.inference_mode()
def run_sample(
    method: str,
    models: EvalModels,
    sample: QASample,
    settings: GenerationSettings,
    other: QASample | None = None,
    note: BatchedNote | None = None,
) -> SampleOutcome:
    """Run one method on one sample, timing each stage (`other`: whose packet lcfx-wrong sends;
    `note`: a text message written ahead in a batch, see `write_notes`)."""
    prompt = format_question_prompt(sample, include_context=False)
    sharer, receiver = _halves(models, method)
    clock = _Clock()
    bytes_sent = 0
    if method == "sharer":
        receiver = Receiver(*models.sharer)
        prepared = receiver.prepare_plain(prompt, [sample.sharer_context])
    elif method == "receiver":
        prepared = receiver.prepare_plain(prompt, [sample.receiver_context])
    elif method in ("forward", "forward-selected", *READER_METHODS):
        channel = READER_METHODS.get(method, method)
        if method in READER_METHODS:
            receiver = Receiver(models.adapters[method].model, models.receiver[1])
        if channel == "forward":
            forwarded = "" if sample.same_context else sample.sharer_context
        else:
            forwarded = _selected_text(models, sample, prompt, clock)
        bytes_sent = len(forwarded.encode())
        prepared = receiver.prepare_plain(
            prompt, _contexts(*reader_contexts(forwarded, sample.receiver_context))
        )
    elif method in NOTE_METHODS:
        if note is not None:
            message = note.text
            clock.add({"message_generate_batched": note.amortised_ms})
        else:
            message = sharer.write_message(sample.sharer_context, sample.question, style=NOTE_METHODS[method])
            clock.stage("message_generate")
        bytes_sent = len(message.encode())
        contexts = text_contexts(
            sample.receiver_context if not sample.same_context else sample.sharer_context, message
        )
        prepared = receiver.prepare_plain(prompt, contexts)
    elif method == "c2c":
        prepared, bytes_sent = c2c_prepare(
            models.adapters["c2c"], models.sharer, receiver, sample.sharer_context, prompt
        )
        clock.add(prepared.timings_ms)
    elif method == "kvcomm":
        # Same context: the document is shared, so the prefix is the whole of what the receiver reads.
        own = "" if sample.same_context else sample.receiver_context
        handoff = kvcomm_input(receiver.tokenizer, prompt, sample.sharer_context, own)
        cache = sharer_prefix(models.sharer[0], handoff)
        clock.stage("sharer_prefill")
        bytes_sent = send_layers(cache, models.kvcomm_layers, handoff.prefix_length)
        clock.stage("encode")
        prepared = prepare_receiver(receiver.model, handoff, cache, models.kvcomm_layers)
    elif method in ("lcf", *LCFX_METHODS):
        source = other if method == "lcfx-wrong" and other is not None else sample
        source_prompt = format_question_prompt(source, include_context=False)
        context = sharer.prefill(source.sharer_context)
        clock.stage("sharer_prefill")
        if method == "lcf":
            latents = sharer.encode(context)
        else:
            latents = sharer.encode(
                context,
                receiver_text=receiver_view(source.receiver_context, source_prompt),
                question=source_prompt,
            )
        bytes_sent = through_the_wire(latents, models.wire)
        clock.stage("encode")
        if method == "lcf":
            prepared = receiver.prepare_lcf(latents, sample.sharer_context, prompt)
        else:
            prepared = receiver.prepare_lcfx(latents, prompt, sample.receiver_context)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method != "c2c":
        clock.stage("receiver_prefill")
    generated = receiver.generate(prepared, settings, on_first_token=clock.first_token)
    clock.stage("generate")
    timings = clock.finish()
    timings.setdefault("time_to_first_token", timings["total"])  # no token at all: the wait was the whole run
    if method in NOTE_METHODS and note is not None:  # the note was written before the clock started
        timings["time_to_first_token"] += note.amortised_ms
        timings["total"] += note.amortised_ms
    return scored(method, sample, generated, bytes_sent, timings)


def scored(
    method: str, sample: QASample, generated: str, bytes_sent: int, timings: dict[str, float]
) -> SampleOutcome:
    """One method's answer to one sample, scored (in-process or through the services)."""
    prediction = extract_answer(generated)
    return SampleOutcome(
        method=method,
        sample_id=sample.id,
        prediction=prediction,
        generated=generated,
        em=exact_match(prediction, sample.answers),
        f1=token_f1(prediction, sample.answers),
        bytes_sent=bytes_sent,
        contains=contains_answer(generated, sample.answers),
        timings_ms=timings,
        empty=not generated.strip(),
        facts_stated=facts_stated(generated, sample.answers) if sample.open_ended else None,
    )


def _selected_text(models: EvalModels, sample: QASample, prompt: str, clock: _Clock) -> str:
    """forward-selected's text: the sentences the lcfx adapter's selection holds for this question."""
    lcfx = models.adapters["lcfx"]
    sharer = Sharer(*models.sharer, lcfx.encoder, lcfx.config)
    context = sharer.prefill(sample.sharer_context)
    clock.stage("sharer_prefill")
    text = sharer.selected_text(context, prompt)
    clock.stage("select")
    return text


@dataclass
class BatchedNote:
    """A text message written in a batch: its text and the batch's time divided by its size."""

    text: str
    amortised_ms: float


def write_notes(
    models: EvalModels, samples: list[QASample], batch_size: int, style: str = "fair"
) -> dict[str, BatchedNote]:
    """A note method's messages for every sample, `batch_size` at a time (keyed by sample id).

    Accuracy only: the time recorded is amortised over the batch, not any handoff's latency."""
    sharer = Sharer(*models.sharer)
    notes: dict[str, BatchedNote] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc=f"{style} notes", unit="batch"):
        chunk = samples[start : start + batch_size]
        began = time.perf_counter()
        texts = sharer.write_messages([(s.sharer_context, s.question) for s in chunk], style=style)
        each = (time.perf_counter() - began) * 1000 / len(chunk)
        notes.update({s.id: BatchedNote(t, each) for s, t in zip(chunk, texts, strict=True)})
    return notes


def applicable(method: str, sample: QASample) -> bool:
    return sample.same_context or method not in SAME_CONTEXT_ONLY


def evaluate(
    methods: list[str],
    models: EvalModels,
    samples: list[QASample],
    settings: GenerationSettings,
    text_batch: int = 1,
) -> list[SampleOutcome]:
    """Every method on every sample it applies to (methods interleaved per sample, so drift
    in machine load hits all methods alike). text_batch > 1 writes the text baseline's notes
    ahead, in batches (`write_notes`): its accuracy is measured, its latency is not."""
    notes = {
        method: write_notes(models, samples, text_batch, style)
        for method, style in NOTE_METHODS.items()
        if text_batch > 1 and method in methods
    }
    outcomes = []
    for index, sample in enumerate(tqdm(samples, desc="eval", unit="sample")):
        other = samples[(index + 1) % len(samples)]
        for method in methods:
            if applicable(method, sample):
                note = notes[method].get(sample.id) if method in notes else None
                outcomes.append(run_sample(method, models, sample, settings, other, note))
    return outcomes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarize(outcomes: list[SampleOutcome], models: EvalModels | None = None) -> list[dict]:
    """Per method: EM and F1 with 95% CIs, median and p90 of every stage, bytes, adapter size, the
    share of empty answers, and on open prompts the share of the document's facts stated."""
    rows = []
    for method in dict.fromkeys(o.method for o in outcomes):
        mine = [o for o in outcomes if o.method == method]
        em, em_lo, em_hi = mean_with_ci([o.em for o in mine])
        f1, f1_lo, f1_hi = mean_with_ci([o.f1 for o in mine])
        contains, contains_lo, contains_hi = mean_with_ci([o.contains for o in mine])
        stages = sorted({s for o in mine for s in o.timings_ms})
        latency = {
            s: {
                "median": statistics.median([o.timings_ms.get(s, 0.0) for o in mine]),
                "p90": percentile([o.timings_ms.get(s, 0.0) for o in mine], 0.9),
            }
            for s in stages
        }
        row = {
            "method": method,
            "n": len(mine),
            "em": em,
            "em_ci": [em_lo, em_hi],
            "f1": f1,
            "f1_ci": [f1_lo, f1_hi],
            "contains": contains,
            "contains_ci": [contains_lo, contains_hi],
            "latency_ms": latency,
            "bytes_sent_median": statistics.median([o.bytes_sent for o in mine]),
            "empty_rate": sum(o.empty for o in mine) / len(mine),
        }
        stated = [o.facts_stated for o in mine if o.facts_stated is not None]
        if stated:  # open prompts
            mean, low, high = mean_with_ci(stated, bounds=(0.0, 1.0))
            row["facts_stated"], row["facts_stated_ci"] = mean, [low, high]
        adapter = (models.adapters.get(method) if models else None) or None
        if adapter is not None:
            params = adapter_parameters(adapter)
            row["adapter_parameters"] = params
            row["adapter_mb_bf16"] = params * 2 / 1e6
        rows.append(row)
    return rows


def adapter_parameters(adapter) -> int:
    return adapter.parameter_counts()["total"]


def outcome_records(outcomes: list[SampleOutcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]
