"""`lcflow eval`: every method on the same samples; EM/F1 with 95% CIs, latency per stage, plots.

    lcflow eval --pair smollm2-to-gemma3 --task facts-cross --n 500 --out runs/cross
    lcflow eval --sharer DIR --receiver DIR --task-file mine.jsonl --adapter-lcfx DIR --out runs/mine

Every method runs unless --methods picks some (receiver, sharer, forward, text, text-c2c,
forward-selected, forward+reader, forward-selected+reader, c2c, kvcomm, lcf, lcfx, ...;
lcflow.eval.harness says what each is). forward-selected forwards the sentences the lcfx adapter
selects, so it needs that adapter; the +reader methods load a text reader (`lcflow train --mode
text-reader`); kvcomm needs no adapter, one model on both sides, and chooses its layers on
calibration samples first (--kvcomm-fraction, --kvcomm-calibration).

Writes OUT/results.json (summary rows, per-sample records, meta), OUT/results.md (the table)
and the plots OUT/accuracy_vs_ttft.png and OUT/latency_breakdown.png, and prints the table.

Adapter methods (c2c, lcf, lcfx, lcfx-pruned) load `--adapter-METHOD DIR`, or by default
ADAPTERS/<pair>-<method> (ADAPTERS: the repo's adapters/ directory); the text readers load
--adapter-reader-selected / --adapter-reader-forward, by default ADAPTERS/<pair>-reader-selected
and ADAPTERS/<pair>-reader-forward. A method whose adapter is
missing, does not fit the models or cannot apply to the task is skipped with its reason printed
(and recorded in results.json), so one missing adapter does not cost the whole run.

Latency is measured in-process (see lcflow.eval.harness), or with `--services SHARER_HOST:PORT`
through running services for the methods they serve (receiver, the text channels and their
readers, lcf/lcfx), labelled so.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lcflow.commands.preflight import check_model
from lcflow.core.names import (
    LCFX_METHODS,
    METHOD_ALIASES,
    METHODS,
    PAIRS,
    READER_METHODS,
    SAME_CONTEXT_ONLY,
    check_wire_form,
)
from lcflow.eval.report import markdown_table, write_report
from lcflow.eval.services import evaluate_through_services
from lcflow.provision import ProvisionError
from lcflow.serving.security import add_client_security_flags, client_security_from_args
from lcflow.tasks import (
    OPEN_ANSWER_TOKENS,
    SHORT_ANSWER_TOKENS,
    SPLITS,
    TASK_NAMES,
    QASample,
    get_task,
    load_task_file,
)

if TYPE_CHECKING:  # torch and the harness are imported where used: `lcflow --help` stays fast
    import torch

    from lcflow.eval.harness import EvalModels, SampleOutcome

log = logging.getLogger(__name__)

ADAPTER_MODES = {
    "c2c": "c2c",
    "lcf": "lcf",
    "lcfx": "lcfx",
    "lcfx-pruned": "lcfx",
    "lcfx-wrong": "lcfx",
    "forward-selected": "lcfx",
    "forward+reader": "text-reader",
    "forward-selected+reader": "text-reader",
}
# Methods that run another method's adapter: the wrong-packet control must use lcfx's own, and
# forward-selected forwards what lcfx's selection holds.
SHARES_ADAPTER = {"lcfx-wrong": "lcfx", "forward-selected": "lcfx"}
# The text readers' adapter names: the flag --adapter-NAME and the default ADAPTERS/<pair>-NAME.
READER_ADAPTERS = {"forward+reader": "reader-forward", "forward-selected+reader": "reader-selected"}
# KVComm's defaults: the fraction of layers sent whole (the best of four on facts-cross train
# samples, Gemma3: docs/results/kvcomm-fraction-gemma3-to-gemma3-facts-cross-train.json) and the
# calibration samples that choose them.
KVCOMM_FRACTION = 0.5
KVCOMM_CALIBRATION = 8
DEFAULT_N = 500  # samples drawn from a built-in task; a task file is used whole unless --n is given


def default_adapter_root() -> Path:
    """The repo's adapters/ directory when running from a checkout, else ./adapters."""
    in_repo = Path(__file__).resolve().parents[2] / "adapters"
    return in_repo if in_repo.is_dir() else Path("adapters")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="all methods on the same samples: EM/F1 with CIs, latency, plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = p.add_argument_group("models (--pair, or --sharer and --receiver)")
    models.add_argument("--pair", choices=sorted(PAIRS), help="a named sharer/receiver pair")
    models.add_argument("--sharer", help="sharer model: a `lcflow models list` name, a local dir or a hub id")
    models.add_argument("--receiver", help="receiver model (same forms as --sharer)")
    models.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    data = p.add_argument_group("samples")
    data.add_argument(
        "--task", default="facts-cross", choices=TASK_NAMES, help="built-in task (default %(default)s)"
    )
    data.add_argument(
        "--task-file",
        type=Path,
        help="your own samples instead of --task: JSONL, one object per line with sharer_context, "
        "receiver_context, question, answers (a list); optional id, task, same_context "
        "(see lcflow.tasks.jsonl)",
    )
    data.add_argument("--split", default="test", choices=SPLITS, help="split of the built-in task")
    data.add_argument(
        "--n", type=int, help=f"number of samples (default {DEFAULT_N}; a task file: all of it)"
    )
    data.add_argument("--seed", type=int, default=0, help="seed for drawing samples and for generation")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated, from: %(default)s (the default: all of them)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"longest answer, in tokens (default {SHORT_ANSWER_TOKENS}, or {OPEN_ANSWER_TOKENS} when the"
        " samples are open prompts such as facts-open's)",
    )
    p.add_argument(
        "--text-batch",
        type=int,
        default=1,
        metavar="N",
        help="write the text baseline's notes N at a time before the run (in-process only): its "
        "accuracy on hundreds of samples in a fraction of the time, its latency not measured "
        "(recorded amortised, as message_generate_batched). Default 1: each note timed in its handoff",
    )
    p.add_argument(
        "--wire",
        type=check_wire_form,
        default="exact",
        help="in-process: put the latents through the wire's number format before the receiver "
        "decodes them: exact (as encoded, float32), bf16, int8, int4 or int4-hadamard (the sharer's "
        "--quantize codecs, lcflow.transport.quantize), an int4 one with its group size after -g "
        "(int4-hadamard-g32: for rows the default group of 64 does not divide); bytes sent counted accordingly",
    )
    adapters = p.add_argument_group(
        "adapters (default: ADAPTERS/<pair>-<method>; for lcfx, else ADAPTERS/<pair>-lcfx-bridge, "
        "the design that works across families)"
    )
    for method in [m for m in ADAPTER_MODES if m not in SHARES_ADAPTER and m not in READER_ADAPTERS]:
        adapters.add_argument(f"--adapter-{method}", metavar="DIR", help=f"adapter directory for {method}")
    for method, name in READER_ADAPTERS.items():
        adapters.add_argument(f"--adapter-{name}", metavar="DIR", help=f"text reader for {method}")
    adapters.add_argument(
        "--adapters",
        type=Path,
        default=default_adapter_root(),
        metavar="ADAPTERS",
        help="where default adapter directories are looked for (default: the repo's adapters/)",
    )
    kvcomm = p.add_argument_group("kvcomm (the training-free KV baseline; same-model pairs only)")
    kvcomm.add_argument(
        "--kvcomm-fraction",
        type=float,
        default=KVCOMM_FRACTION,
        metavar="F",
        help="the fraction of layers that get the sharer's whole KV prefix, chosen by KVComm's "
        "attention rule (layer 0 always; the rest keep only the first position); default %(default)s",
    )
    kvcomm.add_argument(
        "--kvcomm-calibration",
        type=int,
        default=KVCOMM_CALIBRATION,
        metavar="N",
        help="samples the layer choice reads: the first N of the built-in task's train split (a task "
        "file: its first N samples, which are also evaluated); default %(default)s",
    )
    p.add_argument(
        "--services",
        metavar="SHARER_HOST:PORT",
        help=(
            "time the methods the services serve (receiver, text, forward, forward-selected, their +reader "
            "methods, lcf, lcfx) through the running sharer at this address instead of in-process; start both "
            "services with the same adapters first (a text reader is named by its directory's basename, which "
            "the receiver's --adapters must hold)"
        ),
    )
    p.add_argument(
        "--sharer-sessions",
        action="store_true",
        help="with --services: open each sample's sharer context as a session first (untimed, as an "
        "agent's context already is), and hand off from it",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, plots")
    add_client_security_flags(p)  # for --services: TLS and the token of the sharer
    p.set_defaults(func=run)


# --- what to run -----------------------------------------------------------------------------------


@dataclass
class EvalPlan:
    """Everything decided from the flags before any model is loaded."""

    sharer: str
    receiver: str
    pair: str | None  # the PAIRS name, for default adapter directories
    task: str
    split: str
    samples: list[QASample]
    methods: list[str]  # still to run
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it is not run

    def skip(self, method: str, reason: str) -> None:
        print(f"skipping {method}: {reason}")
        self.skipped[method] = reason
        self.methods.remove(method)


def parse_methods(text: str) -> list[str]:
    named = (m.strip() for m in text.split(",") if m.strip())
    methods = list(dict.fromkeys(METHOD_ALIASES.get(m, m) for m in named))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not methods:
        raise ValueError("--methods is empty")
    return methods


def resolve_models(args) -> tuple[str, str, str | None]:
    """(sharer, receiver, pair name or None) from --pair or --sharer/--receiver."""
    if args.pair:
        if args.sharer or args.receiver:
            raise ValueError("give either --pair or --sharer/--receiver, not both")
        return *PAIRS[args.pair], args.pair
    if not (args.sharer and args.receiver):
        raise ValueError(f"give --pair ({', '.join(sorted(PAIRS))}) or both --sharer and --receiver")
    pair = next((name for name, models in PAIRS.items() if models == (args.sharer, args.receiver)), None)
    return args.sharer, args.receiver, pair


def load_samples(args) -> tuple[str, str, list[QASample]]:
    """(task label, split label, samples) from --task-file or --task/--split/--n/--seed."""
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be at least 1, not {args.n}")
    if args.task_file:
        if not args.task_file.is_file():
            raise ValueError(f"task file {args.task_file} does not exist")
        samples = load_task_file(args.task_file)
        return args.task_file.name, "file", samples[: args.n] if args.n else samples
    return args.task, args.split, get_task(args.task).samples(args.split, args.n or DEFAULT_N, seed=args.seed)


def make_plan(args) -> EvalPlan:
    sharer, receiver, pair = resolve_models(args)
    methods = parse_methods(args.methods)
    task, split, samples = load_samples(args)
    plan = EvalPlan(sharer, receiver, pair, task, split, samples, methods)
    if "kvcomm" in methods and not 0 < args.kvcomm_fraction <= 1:
        raise ValueError(f"--kvcomm-fraction must be in (0, 1], not {args.kvcomm_fraction}")
    if "kvcomm" in methods and args.kvcomm_calibration < 1:
        raise ValueError(f"--kvcomm-calibration must be at least 1, not {args.kvcomm_calibration}")
    if not any(s.same_context for s in samples):
        for method in [m for m in plan.methods if m in SAME_CONTEXT_ONLY]:
            plan.skip(method, f"same-context tasks only, and no sample of {task} shares its context")
    return plan


# --- models and adapters ---------------------------------------------------------------------------


def load_models(sharer: str, receiver: str, device: str) -> tuple[tuple, tuple]:
    """((sharer model, tokenizer), (receiver model, tokenizer)), one model where the names match
    (nothing in an eval changes a model: a receiver LoRA is merged into a copy); the seam tests
    may replace."""
    from lcflow.provision.loading import load_pair  # keeps --help fast

    check_model(sharer, "--sharer")  # both names first: a typo is one line, not a hub retried for 20 s
    check_model(receiver, "--receiver")
    return load_pair(sharer, receiver, device)


def adapter_dir(method: str, args, pair: str | None) -> tuple[Path | None, str]:
    """(directory, "") for a method's adapter, or (None, why there is none)."""
    method = READER_ADAPTERS.get(method, SHARES_ADAPTER.get(method, method))
    flag = f"--adapter-{method}"
    explicit = getattr(args, f"adapter_{method.replace('-', '_')}")
    if explicit:
        path = Path(explicit)
        return (path, "") if path.is_dir() else (None, f"{flag} {path} is not a directory")
    if pair is None:
        return None, f"no {flag} DIR given (no default adapter for models outside the named pairs)"
    path = args.adapters / f"{pair}-{method}"
    for candidate in (path, *([args.adapters / f"{pair}-lcfx-bridge"] if method == "lcfx" else [])):
        if candidate.is_dir():
            return candidate, ""
    make = {
        "lcfx-pruned": f"`lcflow prune {args.adapters / f'{pair}-lcfx'} --out {path}`",
        # the slot packet `lcflow train --mode lcfx` makes from scratch carries nothing (docs/lcfx.md)
        "lcfx": "`lcflow align --identity` then `lcflow train --init-adapter` (one model family) "
        "or `lcflow bridge` (two families), as scripts/build_adapters.sh does",
        "reader-selected": f"`lcflow train --mode text-reader --channel forward-selected --init-adapter "
        f"{args.adapters / f'{pair}-lcfx'} ... --out {path}`",
        "reader-forward": f"`lcflow train --mode text-reader --channel forward ... --out {path}`",
    }.get(method, f"`lcflow train --mode {ADAPTER_MODES.get(method)} ... --out {path}`")
    return None, f"no adapter at {path} (make one with {make}, or pass {flag} DIR)"


def load_adapter(method: str, path: Path, sharer_id, receiver_id, device, receiver=None):
    """A method's adapter, checked against the models and the mode the method needs (a text
    reader also needs the receiver (model, tokenizer) it wraps)."""
    if method in READER_METHODS:
        from lcflow.adapter.reader import TextReader  # keeps --help fast

        reader = TextReader.from_pretrained(path, *receiver, name=receiver_id.name)
        if reader.config.channel != READER_METHODS[method]:
            raise ValueError(
                f"{path} reads {reader.config.channel}; {method} needs a reader of {READER_METHODS[method]}"
            )
        return reader
    if method == "c2c":
        # The harness needs c2c_prepare too; a partial C2C module means no c2c, not a crash mid-run.
        from lcflow.adapter.c2c import C2CFuser  # keeps --help fast
        from lcflow.handoff.c2c import c2c_prepare  # noqa: F401 (keeps --help fast)

        return C2CFuser.from_pretrained(path, sharer=sharer_id, receiver=receiver_id, device=device)
    from lcflow.adapter import LatentAdapter  # keeps --help fast

    adapter = LatentAdapter.from_pretrained(path, sharer=sharer_id, receiver=receiver_id, device=device)
    if adapter.config.mode != ADAPTER_MODES[method]:
        raise ValueError(
            f"{path} holds a {adapter.config.mode} adapter; {method} needs {ADAPTER_MODES[method]}"
        )
    return adapter


def load_adapters(plan: EvalPlan, args, models: EvalModels) -> dict[str, dict]:
    """Fill models.adapters for the planned adapter methods; skip the ones that cannot load.
    Returns what results.json records per adapter (path, mode, parameter counts)."""
    from lcflow.core.kv import model_identity  # keeps --help fast

    ids = (
        model_identity(*models.sharer, name=plan.sharer),
        model_identity(*models.receiver, name=plan.receiver),
    )
    info = {}
    for method in [m for m in plan.methods if m in ADAPTER_MODES]:
        if method in SELECTS_WITH_LCFX:  # the sentences forwarded are those lcfx's selection holds
            reason = _load_into(plan, args, models, ids, "lcfx", info)
            if reason:
                plan.skip(method, f"it forwards what the lcfx adapter selects, and {reason}")
                continue
            if "lcfx" in models.adapters and models.adapters["lcfx"].config.packet not in ("spans", "bridge"):
                plan.skip(method, f"{info['lcfx']['path']} packs slots, not a selection of sentences")
                continue
            if method == "forward-selected":
                continue  # no adapter of its own
        reason = _load_into(plan, args, models, ids, method, info)
        if reason:
            plan.skip(method, reason)
    return info


# forward-selected (and its reader) forward the sentences the lcfx adapter's selection holds.
SELECTS_WITH_LCFX = ("forward-selected", "forward-selected+reader")


def _load_into(plan: EvalPlan, args, models: EvalModels, ids: tuple, method: str, info: dict) -> str:
    """Load `method`'s adapter into models.adapters (once), recording it in `info`; returns why
    it cannot be had, or ""."""
    if method in models.adapters:
        return ""
    path, reason = adapter_dir(method, args, plan.pair)
    if path is None:
        return reason
    try:
        adapter = load_adapter(method, path, *ids, models.receiver[0].device, models.receiver)
    except ImportError as err:
        return f"{method} support is not available ({err})"
    except (ValueError, FileNotFoundError, OSError) as err:  # wrong models or mode, incomplete dir
        return f"cannot use {path}: {err}"
    if getattr(adapter, "encoder", None) is not None and adapter.config.packet == "bridge":
        adapter.encoder.attach_receiver_tokenizer(models.receiver[1])  # it cuts text as the receiver does
    models.adapters[method] = adapter
    if method in LCFX_METHODS:
        from lcflow.adapter.reader import receiver_reader_model  # keeps --help fast

        # lcfx-wrong reads with lcfx's adapter: one merged copy of the receiver serves both
        shared = [m for m in models.packet_readers if info[m]["path"] == str(path)]
        try:
            reader = (
                models.packet_readers[shared[0]]
                if shared
                else receiver_reader_model(path, *models.receiver, name=ids[1].name)
            )
        except (ValueError, FileNotFoundError, OSError) as err:
            del models.adapters[method]
            return f"cannot use {path}'s receiver-side LoRA: {err}"
        if reader is not None:
            models.packet_readers[method] = reader
    counts = adapter.parameter_counts()
    info[method] = {
        "path": str(path),
        "mode": adapter.config.mode,
        "parameters": counts["total"],
        "parameter_counts": counts,
        "mb_bf16": counts["total"] * 2 / 1e6,
        # Two methods compared should read weights of one precision (a run's float32 against a
        # shipped bf16 adapter is not the same method): recorded so that a reader can check.
        "stored_dtypes": stored_dtypes(path),
    }
    if adapter.config.mode == "lcfx":  # what the packet is: a copy may differ from its card here
        config = adapter.config
        info[method]["packet"] = {
            "packet": config.packet,
            "slots": config.slots,
            "selection": config.selection,
            "selection_heads": config.selection_heads,
            "selection_chunk": config.selection_chunk,
        }
    if method in models.packet_readers:
        from lcflow.adapter.reader import RECEIVER_READER  # keeps --help fast

        info[method]["receiver_lora"] = str(path / RECEIVER_READER)
    return ""


def stored_dtypes(directory: Path) -> list[str]:
    """The dtypes the adapter directory's *.safetensors files store (from their headers: nothing
    is loaded), e.g. ["BF16"]."""
    from safetensors import safe_open  # keeps --help fast

    found = set()
    for weights in Path(directory).rglob("*.safetensors"):  # a receiver-side LoRA sits in a subdirectory
        with safe_open(str(weights), "pt") as handle:
            found.update(handle.get_slice(key).get_dtype() for key in handle.keys())
    return sorted(found)


def calibrate_kvcomm(plan: EvalPlan, args, models: EvalModels) -> dict:
    """KVComm's layer choice, into models.kvcomm_layers (make_plan checked its flags); skips
    kvcomm when the two sides are not one model. Returns what results.json records of it."""
    from lcflow.core.kv import model_identity  # keeps --help fast
    from lcflow.handoff.kvcomm import calibrate  # keeps --help fast
    from lcflow.tasks import format_question_prompt  # keeps --help fast

    sharer, receiver = model_identity(*models.sharer), model_identity(*models.receiver)
    same = (sharer.config_hash, sharer.tokenizer_hash) == (receiver.config_hash, receiver.tokenizer_hash)
    if not same:
        plan.skip("kvcomm", "same-model pairs only: the receiver reads the sharer's KV as its own")
        return {}
    if args.task_file:
        source, samples = f"{plan.task}, its first samples", plan.samples[: args.kvcomm_calibration]
    else:
        source = f"{plan.task} train split"
        samples = get_task(plan.task).samples("train", args.kvcomm_calibration, seed=args.seed)
    triples = [
        (
            format_question_prompt(s, include_context=False),
            s.sharer_context,
            "" if s.same_context else s.receiver_context,
        )
        for s in samples
    ]
    layers = calibrate(*models.receiver, triples, args.kvcomm_fraction)
    models.kvcomm_layers = frozenset(layers)
    print(f"kvcomm: layers {sorted(layers)} get the whole prefix (calibrated on {len(samples)} of {source})")
    return {
        "fraction": args.kvcomm_fraction,
        "calibration": f"{len(samples)} of {source}",
        "layers": sorted(layers),
    }


# --- measuring -------------------------------------------------------------------------------------


def measure(args, methods, models, samples, settings, adapters: dict) -> tuple[list[SampleOutcome], str]:
    """The outcomes and the label of where their latency was measured (`adapters`: what
    load_adapters loaded, by method, with its path)."""
    from lcflow.eval.harness import evaluate  # keeps --help fast

    if args.services:
        security = client_security_from_args(args)
        readers = {m: Path(adapters[m]["path"]).name for m in READER_METHODS if m in adapters}
        outcomes = evaluate_through_services(
            args.services, methods, models, samples, settings, security, args.sharer_sessions, readers
        )
        held = "; sharer contexts held in sessions (prefill not timed)" if args.sharer_sessions else ""
        return outcomes, f"services at {args.services}{held}"
    label = "in-process"
    if args.text_batch > 1 and "text" in methods:
        label += f"; text notes written {args.text_batch} at a time (text latency amortised, not a handoff's)"
    return evaluate(methods, models, samples, settings, args.text_batch), label


# --- the record ------------------------------------------------------------------------------------


def command_line() -> str:
    return shlex.join(["lcflow", *sys.argv[1:]])


def machine_info(device: torch.device) -> dict:
    import torch

    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "accelerator": accelerator,
    }


def make_meta(args, plan: EvalPlan, models: EvalModels, adapters: dict, latency: str) -> dict:
    from lcflow.core.kv import model_identity  # keeps --help fast

    def identity(name: str, pair: tuple) -> dict:
        found = model_identity(*pair, name=name)
        return {"name": name, "config_hash": found.config_hash, "tokenizer_hash": found.tokenizer_hash}

    return {
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(models.receiver[0].device),
        "models": {
            "pair": plan.pair,
            "sharer": plan.sharer,
            "receiver": plan.receiver,
            "sharer_identity": identity(plan.sharer, models.sharer),
            "receiver_identity": identity(plan.receiver, models.receiver),
        },
        "adapters": adapters,
        "task": plan.task,
        "task_file": str(args.task_file) if args.task_file else None,
        "split": plan.split,
        "n": len(plan.samples),
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "text_batch": args.text_batch,
        "wire": args.wire,
        "methods": plan.methods,
        "skipped": plan.skipped,
        "latency": latency,
    }


# --- the command -----------------------------------------------------------------------------------


def run(args) -> int:
    import torch

    from lcflow.eval.harness import EvalModels, outcome_records, summarize  # keeps --help fast
    from lcflow.handoff.generation import GenerationSettings  # keeps --help fast

    if args.sharer_sessions and not args.services:
        print(
            "lcflow eval: --sharer-sessions needs --services (sessions live in the sharer service)",
            file=sys.stderr,
        )
        return 2
    if args.text_batch < 1 or (args.text_batch > 1 and args.services):
        print(
            "lcflow eval: --text-batch takes N >= 1, and only in-process (not with --services)",
            file=sys.stderr,
        )
        return 2
    if args.wire != "exact" and args.services:
        print(
            "lcflow eval: --wire is for in-process runs; with --services the sharer's --quantize decides",
            file=sys.stderr,
        )
        return 2
    try:
        plan = make_plan(args)
    except ValueError as err:
        print(f"lcflow eval: {err}", file=sys.stderr)
        return 2
    if args.services:
        client_security_from_args(args)  # unreadable certificate or token files: say so before loading
    try:
        sharer, receiver = load_models(plan.sharer, plan.receiver, args.device)
    except ProvisionError as err:
        print(f"lcflow eval: {err}", file=sys.stderr)
        return 2
    models = EvalModels(sharer=sharer, receiver=receiver, wire=args.wire)
    adapters = load_adapters(plan, args, models)
    kvcomm = calibrate_kvcomm(plan, args, models) if "kvcomm" in plan.methods else {}
    if not plan.methods:
        print("lcflow eval: no method left to run (see the reasons above)", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    if args.max_new_tokens is None:
        open_prompts = any(sample.open_ended for sample in plan.samples)
        args.max_new_tokens = OPEN_ANSWER_TOKENS if open_prompts else SHORT_ANSWER_TOKENS
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed)
    log.info("eval %s on %d samples of %s", ",".join(plan.methods), len(plan.samples), plan.task)
    try:
        outcomes, latency = measure(args, plan.methods, models, plan.samples, settings, adapters)
    except NotImplementedError as err:
        print(f"lcflow eval: {err}", file=sys.stderr)
        return 2

    rows = summarize(outcomes, models)
    meta = make_meta(args, plan, models, adapters, latency)
    if kvcomm:
        meta["kvcomm"] = kvcomm
    paths = write_report(args.out, rows, outcome_records(outcomes), meta)
    print()
    print(markdown_table(rows))
    for method, reason in plan.skipped.items():
        print(f"skipped {method}: {reason}")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
