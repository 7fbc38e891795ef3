"""`lcflow demo`: the whole pair on loopback, every text channel beside the latent handoff.

1. make sure the demo models are provisioned (`lcflow models pull`, once);
2. start the receiver and the sharer as two separate processes, wait for their health checks;
3. run cross-context questions (the answer is only in the sharer's document) through each
   channel: the note (the sharer writes one sentence), the document forwarded, the sentences
   LCF-X's selection holds forwarded, and LCF_X itself, printing each answer, the expected one,
   two scores (exact match, and whether the answer contains the expected one: a sentence
   around the right word is not wrong), the bytes sent and the stage timings;
4. where the services also hold an LCF adapter for the pair (both serve the repository's
   adapters/ with `--adapters`, the LCF-X adapter as default), same-context questions (both
   agents read the document) through the note and LCF from the same two processes: each
   request names only its mode, the services pick the adapter;
5. stop both services, also on Ctrl-C.

With `--sharer HOST:PORT` only steps 3 and 4 run, against services already running (the
docker-compose demo client does this).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from lcflow.client import HandoffClient, summary_stages
from lcflow.eval.metrics import contains_answer, exact_match, extract_answer
from lcflow.provision import KNOWN_MODELS, pull
from lcflow.serving.telemetry import make_tracer_provider
from lcflow.tasks import get_task, question_prompt

log = logging.getLogger(__name__)

REPO_ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
# Two agents on one base model with different contexts (the paper's cross-context setting):
# the pair whose LCF-X packet the receiver can read (docs/lcfx.md), with its task-trained span
# adapter whose packet is compressed (224 numbers a row; its card's codec, int4 in groups of 32,
# where the sharer finds quantizing pays on its link: docs/lcfx.md section 13.3);
# gemma3-to-gemma3-lcfx is the full-width packet it was distilled from. SmolLM2 -> Gemma3 runs
# with --sharer-model smollm2-135m-instruct --adapter adapters/smollm2-to-gemma3-lcfx-bridge
# (across families: soft tokens, docs/lcfx.md).
DEFAULT_SHARER = "gemma3-270m"
DEFAULT_RECEIVER = "gemma3-270m"
DEFAULT_ADAPTER = "gemma3-to-gemma3-lcfx-compressed"


@dataclass
class DemoOptions:
    sharer_model: str = DEFAULT_SHARER
    receiver_model: str = DEFAULT_RECEIVER
    adapter: str = ""  # empty: the shipped demo adapter, else any LCF-X adapter in adapters/
    adapters: str = ""  # directory of adapters both services serve (empty: the repository's adapters/)
    sharer: str = ""  # HOST:PORT of running services: client part only
    n: int = 8  # enough questions that a person can see the difference
    same_n: int = 4  # same-context questions through LCF, where an LCF adapter is served (0: none)
    max_new_tokens: int = 12
    seed: int = 0
    run_dir: str = ""  # where service logs (with their trace spans) go
    startup_timeout_s: float = 600.0
    security: object = (
        None  # lcflow.serving.security.ClientSecurity for --sharer (TLS, token); None: plaintext
    )


def find_adapter(requested: str, out=print) -> Path:
    """The adapter to serve: as asked, else the shipped demo adapter, else any LCF-X one (said so)."""
    if requested:
        path = Path(requested)
        if not path.is_dir():
            raise SystemExit(f"adapter directory {path} does not exist")
        return path
    shipped = REPO_ADAPTERS / DEFAULT_ADAPTER
    if (shipped / "adapter_config.json").is_file():
        return shipped
    candidates = sorted(
        p.parent for p in REPO_ADAPTERS.glob("*/adapter_config.json") if "lcfx" in p.parent.name
    )
    if not candidates:
        raise SystemExit(
            f"no LCF-X adapter found (looked for {shipped} and adapters/*lcfx*); rebuild the shipped "
            'one with `DIRECTIONS="spans compressed" bash scripts/build_adapters.sh` or pass --adapter DIR'
        )
    out(f"note: the shipped adapter {shipped.name} is not there; using {candidates[0]} instead")
    return candidates[0]


def ensure_models(*names: str, out=print) -> None:

    for name in dict.fromkeys(names):  # one model on both sides is pulled (and said) once
        if name in KNOWN_MODELS:
            result = pull(name)
            out(f"model {name}: {'cached' if result.already_cached else 'provisioned'} at {result.path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, service: str, timeout_s: float, process: subprocess.Popen) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # here: `lcflow --help` imports this module

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {service} process exited with code {process.returncode}; see its log")
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.25)
    raise SystemExit(f"{service} at {address} was not SERVING after {timeout_s:.0f} s")


def adapters_flag(options: DemoOptions) -> list[str]:
    """Serve a directory of adapters too (so one pair of processes answers every mode)."""
    directory = Path(options.adapters) if options.adapters else REPO_ADAPTERS
    return ["--adapters", str(directory)] if directory.is_dir() else []


@contextmanager
def running_pair(options: DemoOptions, adapter: Path, run_dir: Path, out=print):
    """Receiver and sharer as two processes on loopback; stopped (SIGTERM, then kill) on exit."""
    run_dir.mkdir(parents=True, exist_ok=True)
    receiver_port, sharer_port = free_port(), free_port()
    env = {**os.environ, "OTEL_TRACES_EXPORTER": os.environ.get("OTEL_TRACES_EXPORTER", "console")}
    base = [sys.executable, "-m", "lcflow.cli", "serve"]
    commands = {
        "receiver": base
        + [
            "receiver",
            "--model",
            options.receiver_model,
            "--adapter",
            str(adapter),
            *adapters_flag(options),
            "--port",
            str(receiver_port),
        ],
        "sharer": base
        + ["sharer", "--model", options.sharer_model, "--adapter", str(adapter), *adapters_flag(options)]
        + ["--port", str(sharer_port)]
        + ["--receiver", f"127.0.0.1:{receiver_port}"],
    }
    processes: dict[str, subprocess.Popen] = {}
    try:
        for role, command in commands.items():
            log_file = open(run_dir / f"{role}.log", "w")  # noqa: SIM115 - closed with the process
            processes[role] = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**env, "OTEL_SERVICE_NAME": f"lcflow-{role}"},
            )
            out(
                f"started {role} (pid {processes[role].pid}) on 127.0.0.1:{receiver_port if role == 'receiver' else sharer_port}"
            )
        wait_serving(
            f"127.0.0.1:{receiver_port}",
            "lcflow.v1.Receiver",
            options.startup_timeout_s,
            processes["receiver"],
        )
        wait_serving(
            f"127.0.0.1:{sharer_port}", "lcflow.v1.Sharer", options.startup_timeout_s, processes["sharer"]
        )
        out("both services are SERVING")
        yield f"127.0.0.1:{sharer_port}"
    finally:
        for role in ("sharer", "receiver"):
            process = processes.get(role)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if processes:
            out(f"stopped both services; their logs and trace spans are in {run_dir}")


@dataclass(frozen=True)
class Channel:
    """One way to hand off: its label in the output, the Handoff mode and the TEXT channel."""

    label: str
    mode: str  # "text", "lcfx" or "lcf"
    text_channel: str = "note"
    text_reader: str = ""  # a text reader in the services' adapters, for forwarded text


NOTE = Channel("NOTE", "text", "note")
CROSS_CHANNELS = (
    NOTE,
    Channel("FORWARD", "text", "forward"),
    Channel("SELECTED", "text", "forward-selected"),
    Channel("LCFX", "lcfx"),
)
SAME_CHANNELS = (NOTE, Channel("LCF", "lcf"))


@dataclass(frozen=True)
class DemoPart:
    """One part of the demo: questions of `task`, each through every one of `channels`."""

    title: str
    task: str
    mode: str  # the part's latent mode: "lcfx" or "lcf"
    n: int
    channels: tuple[Channel, ...]


def demo_parts(
    options: DemoOptions, served_modes: set[str], readers: set[str] = (), out=print
) -> list[DemoPart]:
    """Cross-context questions through LCF-X (and, where the services hold the pair's text
    reader, through it too); same-context ones through LCF where it is served."""
    cross = CROSS_CHANNELS
    reader = f"{pair_prefix(options)}-reader-selected"
    if reader in readers:  # the control trained as LCF-X was, reading the selected sentences
        cross = (
            *CROSS_CHANNELS[:3],
            Channel("READER", "text", "forward-selected", reader),
            CROSS_CHANNELS[3],
        )
    parts = [
        DemoPart(
            "cross-context: the answer is only in the sharer's document",
            "facts-cross",
            "lcfx",
            options.n,
            cross,
        )
    ]
    if options.same_n > 0 and "lcf" in served_modes:
        parts.append(
            DemoPart(
                "same-context: both agents read the document",
                "facts-same",
                "lcf",
                options.same_n,
                SAME_CHANNELS,
            )
        )
    elif options.same_n > 0:
        out("\n(no LCF adapter for this pair is served: the same-context part is skipped)")
    return parts


def usable_modes(client) -> set[str]:
    """The latent modes the sharer has a usable adapter for (its ListAdapters)."""
    return {a.mode for a in client.list_adapters().adapters if a.usable}


def listed_readers(client) -> set[str]:
    """The text readers in the services' adapter directory (the sharer lists them too)."""
    return {a.name for a in client.list_adapters().adapters if a.mode == "text-reader"}


def pair_prefix(options: DemoOptions) -> str:
    """The adapters' pair name, from the LCF-X adapter's ("gemma3-to-gemma3-lcfx" -> "gemma3-to-gemma3")."""
    name = Path(options.adapter).name if options.adapter else DEFAULT_ADAPTER
    return name.split("-lcfx")[0]


def run_questions(sharer_address: str, options: DemoOptions, out=print) -> list[dict]:
    """Every part's questions through each of its channels; prints and returns one row per question."""
    import grpc

    provider = make_tracer_provider("lcflow-demo-client")
    client = HandoffClient(sharer_address, provider, security=options.security)
    rows = []
    for index, part in enumerate(demo_parts(options, usable_modes(client), listed_readers(client), out)):
        samples = part_samples(part, options)
        try:
            part = warm_up(client, part, samples[-1], out)
        except grpc.RpcError as err:
            # An adapter of this mode can fit the sharer's model but not the receiver's: only
            # the services know, so the optional parts ask them and step aside when refused.
            if index == 0 or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            kind = part.title.split(":")[0]
            out(
                f"\n(the services cannot serve {part.mode.upper()} for this pair, so the {kind} part is skipped:"
            )
            out(f" {err.details()})")
            continue
        out("")
        out(f"== {part.title}: {', '.join(c.label for c in part.channels)}")
        rows.extend(run_part(client, part, samples[:-1], options, out))
    provider.shutdown()
    client.close()
    return rows


def part_samples(part: DemoPart, options: DemoOptions) -> list:
    """The part's `n` held-out questions, and one more (the last) for the warm-up."""

    return get_task(part.task).samples("test", part.n + 1, seed=options.seed)


def warm_up(client, part: DemoPart, sample, out=print) -> DemoPart:
    """One unprinted handoff on each channel, so first-call costs do not skew the timings (and a
    mode the services cannot serve is refused here, before anything is printed). A text channel
    the services refuse (forwarding the selection needs a span adapter) is left out, saying why;
    returns the part with the channels that answered."""
    served = []
    for channel in sorted(part.channels, key=lambda c: c.mode == "text"):  # the latent mode first
        try:
            ask(client, channel, sample, max_new_tokens=2)
        except grpc.RpcError as err:
            if channel.mode != "text" or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            out(f"\n({channel.label} is left out: {err.details()})")
            continue
        served.append(channel)
    return dataclasses.replace(part, channels=tuple(c for c in part.channels if c in served))


def ask(client, channel: Channel, sample, max_new_tokens: int):
    """One handoff of `sample`'s question through `channel`."""

    return client.handoff(
        question_prompt(sample.question),
        mode=channel.mode,
        text_channel=channel.text_channel,
        text_reader=channel.text_reader,
        context=sample.sharer_context,
        receiver_context=sample.receiver_context,
        max_new_tokens=max_new_tokens,
    )


def run_part(client, part: DemoPart, samples: list, options: DemoOptions, out=print) -> list[dict]:
    """Each sample's question through each of the part's channels, printed one under another."""

    rows = []
    for sample in samples:
        out("")
        out(f"question: {sample.question}    expected: {sample.answers[0]}")
        row = {"part": part.task, "question": sample.question, "expected": sample.answers[0], "channels": {}}
        for channel in part.channels:
            result = ask(client, channel, sample, options.max_new_tokens)
            t = result.summary.timings
            answer = extract_answer(result.answer)
            correct = exact_match(answer, sample.answers) == 1.0
            contains = contains_answer(result.answer, sample.answers) == 1.0
            stages = ", ".join(f"{s} {getattr(t, s):.0f}" for s in summary_stages(t))
            verdict = "EM right" if correct else ("contains it" if contains else "wrong")
            out(
                f"  {channel.label:>8}: {answer!r:<24} {verdict:<11}  "
                f"first token {t.time_to_first_token:7.0f} ms, total {t.total:7.0f} ms, "
                f"sent {result.summary.bytes_wire:>7} B  [{stages}]  trace {result.summary.trace_id}"
            )
            row["channels"][channel.label] = {
                "answer": answer,
                "correct": correct,
                "contains": contains,
                "ttft_ms": t.time_to_first_token,
                "total_ms": t.total,
                "bytes": result.summary.bytes_wire,
            }
        rows.append(row)
    return rows


def summarize(rows: list[dict], out=print) -> None:
    """One line per part and channel: exact match, contains, median time to first token and bytes."""
    for part in dict.fromkeys(r["part"] for r in rows):
        group = [r for r in rows if r["part"] == part]
        out("")
        for label in group[0]["channels"]:
            results = [r["channels"][label] for r in group]
            right = sum(r["correct"] for r in results)
            contains = sum(r["contains"] for r in results)
            ttft = sorted(r["ttft_ms"] for r in results)[len(results) // 2]
            sent = sorted(r["bytes"] for r in results)[len(results) // 2]
            out(
                f"{part} {label:>8}: exact match {right}/{len(group)}, contains the answer "
                f"{contains}/{len(group)}, median time to first token {ttft:.0f} ms, median {sent} B sent"
            )
    out("")
    out(
        "These are a handful of questions, to show the channels; the measured comparison (n >= 200, "
        "95% CIs, a text reader trained as LCF-X is) is in docs/results.md."
    )


def run_demo(options: DemoOptions, out=print) -> list[dict]:
    if options.sharer:
        rows = run_questions(options.sharer, options, out)
        summarize(rows, out)
        return rows
    ensure_models(options.sharer_model, options.receiver_model, out=out)
    if options.adapters and not Path(options.adapters).is_dir():
        raise SystemExit(f"adapters directory {options.adapters} does not exist")
    adapter = find_adapter(options.adapter, out)
    out(f"adapter: {adapter}")
    run_dir = Path(
        options.run_dir or Path.home() / ".cache" / "lcflow" / "demo" / time.strftime("%Y%m%d-%H%M%S")
    )
    with running_pair(options, adapter, run_dir, out) as sharer_address:
        rows = run_questions(sharer_address, options, out)
    summarize(rows, out)
    return rows
