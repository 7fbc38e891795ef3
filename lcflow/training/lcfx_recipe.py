"""LCF-X for any pair that shares a tokenizer, in one command: `lcflow train --mode lcfx`.

The recipe of the shipped span adapters (docs/lcfx.md), each step resumable:

    1. init     the closed-form KV alignment, as a span-packet adapter (OUT/init): the exact map
                when one model is on both sides, else reduced-rank ridge on corpus documents
                (lcflow.packets.alignment), at b = cfg.bottleneck
    2. heads    the sharer's retrieval heads (the heads whose question attention selects the
                sentences holding the answer), ranked on training samples (lcflow.training.heads)
    3. distill  task training from the alignment: answer CE + kl_weight * KL to the receiver
                reading the document (lcflow.training.distill), checkpointed and resumable

Two tokenizers need the bridge instead (`lcflow bridge`: the selected sentences as soft tokens).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from lcflow.adapter import AdapterConfig, LatentAdapter
from lcflow.adapter.spans import load_alignment
from lcflow.core.kv import kv_spec, model_identity
from lcflow.core.layer_map import build_layer_map
from lcflow.packets.alignment import collect_stats, fit_alignment, identity_alignment, mean_r2
from lcflow.training.config import TrainConfig
from lcflow.training.corpus import alignment_corpus
from lcflow.training.distill import SpanDistillTrainer
from lcflow.training.heads import choose_heads
from lcflow.training.train import _load, training_samples

log = logging.getLogger(__name__)

INIT_DIR = "init"
HEAD_SAMPLES = 150  # training samples the heads are ranked on (the shipped adapters' choice)


def span_adapter_from_alignment(
    alignment, sharer, receiver, names: tuple[str, str], layer_map: str, slots: int, selection: str
) -> LatentAdapter:
    """An LCF-X span-packet adapter whose halves are the fitted alignment (no task training)."""
    adapter = LatentAdapter.for_models(
        "lcfx",
        model_identity(*sharer, name=names[0]),
        model_identity(*receiver, name=names[1]),
        layer_map_strategy=layer_map,
        packet="spans",
        slots=slots,
        selection=selection,
        bottleneck=alignment.config.bottleneck,
        sharer_window=alignment.config.window,
        receiver_aware=False,
    )
    load_alignment(adapter, alignment)
    identity = not alignment.config.r2 and alignment.config.ridge == 0.0
    adapter.config.training = {
        "method": "the exact map (same model on both sides), no task training"
        if identity
        else "closed-form dense alignment (reduced-rank ridge), no task training",
        "documents": alignment.config.documents,
        "ridge": alignment.config.ridge,
    }
    if alignment.config.r2:
        adapter.config.training["held_out_r2_mean"] = round(mean_r2(alignment.config.r2), 4)
    return adapter


def build_init(cfg: TrainConfig, sharer, receiver, documents: int) -> Path:
    """Step 1: OUT/init, the alignment as a span adapter (kept if already there)."""
    init = Path(cfg.out) / INIT_DIR
    if (init / "adapter_config.json").is_file():
        log.info("alignment: kept %s", init)
        return init
    s_id, r_id = model_identity(*sharer), model_identity(*receiver)
    if s_id.tokenizer_hash != r_id.tokenizer_hash:
        raise ValueError(
            "the sharer and the receiver tokenize differently: a span packet needs one tokenizer; "
            "build a bridge instead (`lcflow bridge --sharer A --reader RECEIVER_SPAN_ADAPTER ...`, "
            "see scripts/build_adapters.sh build_bridge)"
        )
    if s_id.same_model(r_id):
        alignment = identity_alignment(kv_spec(sharer[0].config))
    else:
        s_spec, r_spec = kv_spec(sharer[0].config), kv_spec(receiver[0].config)
        layer_map = build_layer_map(s_spec.num_layers, r_spec.num_layers, cfg.layer_map)
        stats = collect_stats(sharer, receiver, alignment_corpus(documents, cfg.seed), layer_map, 0)
        alignment = fit_alignment(stats, 0, cfg.bottleneck)
    names = (cfg.sharer, cfg.receiver)
    # whole sentences by mean attention per token: the shipped adapters' selection (docs/lcfx.md, section 5)
    adapter = span_adapter_from_alignment(
        alignment, sharer, receiver, names, cfg.layer_map, cfg.slots, "sentences-mean"
    )
    return adapter.save_pretrained(init)


def choose_init_heads(cfg: TrainConfig, init: Path, sharer) -> None:
    """Step 2: the retrieval heads, on training samples, stored in OUT/init (kept if chosen)."""
    config = AdapterConfig.load(init)
    if config.selection_heads:
        return
    samples, _ = training_samples(cfg)
    choice = choose_heads(*sharer, samples[:HEAD_SAMPLES], config.slots)
    config.selection_heads = choice.heads
    config.training["selection_heads"] = {
        "samples": choice.samples,
        "recall": round(choice.recall, 4),
        "recall_all_heads": round(choice.recall_all_heads, 4),
    }
    config.save(init)
    (init / "heads.json").write_text(json.dumps(asdict(choice), indent=1) + "\n")


def train_lcfx(cfg: TrainConfig, sharer_pair=None, receiver_pair=None, documents: int = 1200) -> Path:
    """All three steps; returns OUT, the trained adapter (with OUT/init, the alignment it started from)."""
    sharer = sharer_pair or _load(cfg.sharer, cfg.device)
    receiver = receiver_pair or _load(cfg.receiver, cfg.device)
    init = build_init(cfg, sharer, receiver, documents)
    choose_init_heads(cfg, init, sharer)
    distilled = TrainConfig(**{**asdict(cfg), "init_adapter": str(init)})
    return SpanDistillTrainer(distilled, sharer, receiver).run()  # keeps the init's config: its heads
