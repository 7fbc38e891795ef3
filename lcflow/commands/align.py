"""`lcflow align`: fit the dense, closed-form KV alignment of a sharer/receiver pair.

    lcflow align --pair smollm2-to-gemma3 --out runs/align-smollm2-to-gemma3

Runs both frozen models over a broad corpus (lcflow.training.corpus: task documents of
the train split, random-word sentences, stdlib prose), keeps the moments of (sharer K/V,
receiver K/V of the same characters) per receiver layer, and solves a reduced-rank ridge
regression through a bottleneck of width b (lcflow.packets.alignment). Every window of
sharer layers up to --window is fitted from the same pass; the one with the best mean
held-out R^2 (test-split documents, never trained on) is saved to OUT with all R^2 figures
in OUT/alignment_config.json and OUT/alignment.md. No backward pass: ~0.35 s a document on
2 CPU cores for the SmolLM2 -> Gemma3 pair.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from lcflow.core.layer_map import LAYER_MAP_STRATEGIES, build_layer_map
from lcflow.core.names import PAIRS, SELECTIONS
from lcflow.tasks import get_task
from lcflow.training.corpus import alignment_corpus

log = logging.getLogger(__name__)


def register(subparsers) -> None:

    p = subparsers.add_parser(
        "align",
        help="fit the dense KV alignment of a model pair (closed form, no backprop)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pair", choices=sorted(PAIRS), help="a named sharer/receiver pair")
    p.add_argument("--sharer", help="sharer model: a `lcflow models list` name or a local dir")
    p.add_argument("--receiver", help="receiver model (same forms as --sharer)")
    p.add_argument("--documents", type=int, default=3000, help="corpus documents to fit on")
    p.add_argument("--held-out", type=int, default=100, help="test-split documents to measure R^2 on")
    p.add_argument("--window", type=int, default=1, help="widest window of sharer layers (+-) to try")
    p.add_argument("--bottleneck", type=int, default=128, help="latent width b")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge lambda, relative to mean input variance")
    p.add_argument("--layer-map", default="monotonic", choices=LAYER_MAP_STRATEGIES)
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--out", help="directory to write the alignment to (required unless --from-alignment)")
    p.add_argument(
        "--from-alignment", help="skip fitting: load this alignment directory (to write --adapter-out)"
    )
    p.add_argument(
        "--identity",
        action="store_true",
        help="sharer and receiver are one model: write the exact full-width map instead of fitting",
    )
    p.add_argument(
        "--adapter-out",
        help="also write an LCF-X span-packet adapter initialised from the alignment to this directory",
    )
    p.add_argument("--slots", type=int, default=32, help="m: the span packet's rows per layer")
    p.add_argument(
        "--selection",
        default="sentences",
        choices=SELECTIONS,
        help="span selection: whole sentences by the question's total or mean attention per token, or the m best tokens",
    )
    p.set_defaults(func=run)


def held_out_documents(count: int) -> list[str]:
    """Test-split documents of the cross-context task, both sides: names and values unseen."""
    docs: list[str] = []
    for sample in get_task("facts-cross").samples("test", count):
        docs += [sample.sharer_context, sample.receiver_context]
    return docs[:count]


def r2_table(results: dict[int, dict]) -> str:
    from lcflow.packets.alignment import mean_r2  # here: `lcflow --help` must not import torch

    windows = sorted(results)
    header = "| receiver layer | " + " | ".join(f"window {w}: K / V" for w in windows) + " |"
    lines = [header, "| --- |" + " --- |" * len(windows)]
    for t in sorted(results[windows[0]]):
        cells = [f"{results[w][t]['k']:.3f} / {results[w][t]['v']:.3f}" for w in windows]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{mean_r2(results[w]):.3f}" for w in windows) + " |")
    return "\n".join(lines)


def run(args) -> int:
    # Imported here, not at the top: `lcflow --help` must not import torch.
    import torch

    from lcflow.core.kv import kv_spec  # keeps --help fast
    from lcflow.packets.alignment import (  # keeps --help fast
        KVAlignment,
        collect_stats,
        fit_alignment,
        held_out_r2,
        identity_alignment,
        mean_r2,
    )
    from lcflow.provision.loading import load_model_and_tokenizer  # keeps --help fast

    if args.threads:
        torch.set_num_threads(args.threads)
    sharer_name, receiver_name = PAIRS[args.pair] if args.pair else (args.sharer, args.receiver)
    if not sharer_name or not receiver_name:
        raise SystemExit("lcflow align: give --pair, or both --sharer and --receiver")
    sharer = load_model_and_tokenizer(sharer_name, "cpu")
    receiver = load_model_and_tokenizer(receiver_name, "cpu")
    if args.from_alignment or args.identity:
        if not args.adapter_out:
            raise SystemExit(
                "lcflow align: --from-alignment/--identity only write an adapter; give --adapter-out"
            )
        if args.identity:
            from lcflow.core.kv import model_identity  # keeps --help fast

            if not model_identity(*sharer).same_model(model_identity(*receiver)):
                raise SystemExit("lcflow align: --identity needs the same model on both sides")
            alignment = identity_alignment(kv_spec(sharer[0].config))
        else:
            alignment = KVAlignment.from_pretrained(args.from_alignment)
        save_span_adapter(alignment, sharer, receiver, (sharer_name, receiver_name), args)
        return 0
    if not args.out:
        raise SystemExit("lcflow align: give --out (where the fitted alignment goes)")
    s_spec, r_spec = kv_spec(sharer[0].config), kv_spec(receiver[0].config)
    layer_map = build_layer_map(s_spec.num_layers, r_spec.num_layers, args.layer_map)
    started = time.perf_counter()
    documents = alignment_corpus(args.documents, args.seed)
    stats = collect_stats(sharer, receiver, documents, layer_map, args.window)
    collect_s = time.perf_counter() - started
    held_out = held_out_documents(args.held_out)
    results, fits = {}, {}
    for window in range(args.window + 1):
        fits[window] = fit_alignment(stats, window, args.bottleneck, args.ridge)
        results[window] = held_out_r2(fits[window], sharer, receiver, held_out)
        log.info("window %d: mean held-out R^2 %.3f", window, mean_r2(results[window]))
    best = max(results, key=lambda w: mean_r2(results[w]))
    alignment = fits[best]
    alignment.config.r2 = results[best]
    alignment.save_pretrained(args.out)
    report = {
        "sharer": sharer_name,
        "receiver": receiver_name,
        "documents": args.documents,
        "held_out_documents": len(held_out),
        "collect_seconds": round(collect_s, 1),
        "chosen_window": best,
        "r2_by_window": {str(w): {str(t): v for t, v in r.items()} for w, r in results.items()},
    }
    out = Path(args.out)
    (out / "alignment_report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = r2_table(results)
    (out / "alignment.md").write_text(
        f"# Dense alignment {sharer_name} -> {receiver_name}\n\n{args.documents} corpus documents "
        f"(collected in {collect_s:.0f} s), b={alignment.config.bottleneck}, ridge {args.ridge}; "
        f"held-out R^2 on {len(held_out)} test-split documents; chosen window {best}.\n\n{table}\n"
    )
    print(table)
    print(f"saved the window-{best} alignment to {out}")
    if args.adapter_out:
        save_span_adapter(alignment, sharer, receiver, (sharer_name, receiver_name), args)
    return 0


def save_span_adapter(alignment, sharer, receiver, names: tuple[str, str], args) -> None:
    """--adapter-out: the alignment as an LCF-X span adapter (lcflow.training.lcfx_recipe)."""
    from lcflow.training.lcfx_recipe import span_adapter_from_alignment  # keeps --help fast

    adapter = span_adapter_from_alignment(
        alignment, sharer, receiver, names, args.layer_map, args.slots, args.selection
    )
    adapter.save_pretrained(args.adapter_out)
    print(f"saved an LCF-X span adapter (m={args.slots}, {args.selection}) to {args.adapter_out}")
