"""`lcflow bridge`: build an LCF-X bridge adapter, for a sharer of another family than the receiver.

    lcflow bridge --sharer smollm2-135m-instruct --reader adapters/gemma3-to-gemma3-lcfx \\
        --out runs/build/smollm2-to-gemma3-lcfx-bridge
    lcflow heads runs/build/smollm2-to-gemma3-lcfx-bridge --write      (the sharer's retrieval heads)

The packet is the sentences the sharer selects, sent as soft tokens in the receiver's input space;
the receiver reads them with its own model and the reader, a receiver -> receiver span adapter
(lcflow.adapter.bridge). This fits the translator on --documents alignment-corpus documents
(a ridge map, then --steps of a residual MLP on a dense per-token loss; lcflow.training.bridge_fit),
reports the held-out R^2 and nearest-token accuracy on --held-out further documents, and saves the
adapter with the reader's weights copied in. Nothing task-specific is trained here.

The translator depends only on the two models, so another reader (e.g. one refined for two hops)
needs no refitting: --translator-from an existing bridge copies its translator, retrieval heads and
packet settings, and swaps in --reader (seconds; the fitting flags are then not used):

    lcflow bridge --translator-from adapters/smollm2-to-gemma3-lcfx-bridge \
        --reader adapters/gemma3-to-gemma3-lcfx-twohop --out runs/build/smollm2-to-gemma3-bridge-twohop
"""

from __future__ import annotations

import argparse
import time

from lcflow.core.errors import UsageError
from lcflow.training.corpus import alignment_corpus, vocabulary_documents


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bridge",
        help="build an LCF-X bridge adapter (sharer of another family -> a receiver's span adapter)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sharer",
        help="sharer model: a `lcflow models list` name or a local dir (not with --translator-from)",
    )
    p.add_argument(
        "--reader",
        required=True,
        help="a receiver -> receiver LCF-X span adapter directory (its decoder reads)",
    )
    p.add_argument("--out", required=True, help="directory to write the bridge adapter to")
    p.add_argument(
        "--translator-from",
        metavar="BRIDGE",
        help="an existing bridge adapter for the same receiver: keep its translator, heads and packet "
        "settings and only swap in --reader (no models loaded, nothing fitted)",
    )
    p.add_argument("--documents", type=int, default=2000, help="alignment-corpus documents to fit on")
    p.add_argument("--held-out", type=int, default=100, help="further documents to score the fit on")
    p.add_argument(
        "--steps", type=int, default=3000, help="training steps of the residual MLP (0: ridge only)"
    )
    p.add_argument("--batch", type=int, default=512, help="tokens per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the residual MLP")
    p.add_argument(
        "--ridge", type=float, default=1e-3, help="ridge strength, relative to the mean feature variance"
    )
    p.add_argument(
        "--vocabulary-documents",
        type=int,
        default=0,
        help="also fit on this many documents of random sharer vocabulary entries (a sweep of the "
        "vocabulary, so that pieces of unseen names are seen; 48 entries each)",
    )
    p.add_argument(
        "--tokens",
        choices=("whole", "within-sharer"),
        default="whole",
        help="how the selected text is cut into receiver tokens: as the receiver's tokenizer cuts "
        "it, or each sharer token on its own (lcflow.adapter.bridge)",
    )
    p.add_argument("--slots", type=int, default=32, help="m: sharer tokens the selection may choose")
    p.add_argument(
        "--rows", type=int, default=0, help="the packet's most soft tokens (0: m; within-sharer cuts more)"
    )
    p.add_argument(
        "--snap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the receiver replaces each soft token by its nearest input embedding before reading "
        "(adapter config bridge_snap; docs/lcfx.md section 9)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and of training")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imported here, not at the top: `lcflow --help` must not import torch.
    from tqdm import tqdm

    from lcflow.core.kv import model_identity  # keeps --help fast
    from lcflow.provision.loading import load_model_and_tokenizer  # keeps --help fast
    from lcflow.training import bridge_fit as bridge  # keeps --help fast

    if args.documents < 1 or args.held_out < 1 or min(args.steps, args.vocabulary_documents, args.rows) < 0:
        raise UsageError(
            "--documents and --held-out must be at least 1; --steps, "
            "--vocabulary-documents and --rows at least 0"
        )
    reader = _load_adapter(args.reader, "--reader")
    if args.translator_from:
        return swap_reader(args, reader)
    if not args.sharer:
        raise UsageError("--sharer is required (or --translator-from an existing bridge)")
    started = time.perf_counter()
    sharer = load_model_and_tokenizer(args.sharer, args.device)
    receiver = load_model_and_tokenizer(reader.config.receiver.name, args.device)
    hidden = receiver[0].get_input_embeddings().weight.shape[1]
    try:
        adapter = bridge.new_bridge_adapter(
            model_identity(*sharer, name=args.sharer),
            model_identity(*receiver, name=reader.config.receiver.name),
            hidden,
            reader,
            args.slots,
            tokens=args.tokens,
            rows=args.rows,
            snap=args.snap,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    adapter.encoder.attach_receiver_tokenizer(receiver[1])
    corpus = alignment_corpus(args.documents + args.held_out, seed=args.seed)
    corpus[args.documents : args.documents] = vocabulary_documents(
        sharer[1], args.vocabulary_documents, seed=args.seed
    )
    fitted = args.documents + args.vocabulary_documents
    pairs = [bridge.translation_pairs(adapter, sharer, receiver, d) for d in tqdm(corpus, desc="pairs")]
    fit = bridge.TranslationPairs.concat(pairs[:fitted])
    held_out = bridge.TranslationPairs.concat(pairs[fitted:])
    bridge.fit_ridge(adapter, fit, args.ridge)
    ridge_scores = bridge.held_out_scores(adapter, held_out, receiver[0])
    print(f"ridge: held-out R^2 {ridge_scores['r2']:.3f}, nearest token {ridge_scores['nearest_token']:.3f}")
    losses = bridge.train_residual(adapter, fit, receiver[0], args.steps, args.batch, args.lr, args.seed)
    scores = bridge.held_out_scores(adapter, held_out, receiver[0])
    print(f"trained: held-out R^2 {scores['r2']:.3f}, nearest token {scores['nearest_token']:.3f}")
    adapter.config.training = {
        "method": "bridge: ridge + residual MLP (dense per-token CE + MSE) on alignment-corpus documents; "
        "reader copied, no task training",
        "reader": args.reader,
        "documents": args.documents,
        "vocabulary_documents": args.vocabulary_documents,
        "tokens": len(fit.x),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "ridge": args.ridge,
        "seed": args.seed,
        "held_out_documents": args.held_out,
        "held_out_ridge": ridge_scores,
        "held_out": scores,
        "losses_every_50": losses,
        "seconds": round(time.perf_counter() - started),
    }
    adapter.save_pretrained(args.out)
    print(f"saved the bridge adapter to {args.out}; next: lcflow heads {args.out} --write")
    return 0


def swap_reader(args, reader) -> int:
    """--translator-from: the existing bridge's translator with --reader's weights and config."""
    from lcflow.training import bridge_fit as bridge  # keeps --help fast

    if args.sharer:
        raise UsageError("--sharer comes from --translator-from's bridge; give only one")
    original = _load_adapter(args.translator_from, "--translator-from")
    try:
        adapter = bridge.with_reader(original, reader)
    except ValueError as err:
        raise UsageError(str(err)) from err
    adapter.config.training = {
        **original.config.training,
        "reader": args.reader,
        "translator_from": args.translator_from,
    }
    adapter.save_pretrained(args.out)
    print(f"saved {args.out}: the translator of {args.translator_from}, read by {args.reader}")
    return 0


def _load_adapter(path: str, flag: str):
    from lcflow.adapter import LatentAdapter  # keeps --help fast

    try:
        return LatentAdapter.from_pretrained(path)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"{flag}: {err}") from err
