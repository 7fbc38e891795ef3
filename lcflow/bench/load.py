"""`lcflow bench load`: many handoffs at once against running services.

    lcflow bench load --sharer 127.0.0.1:50051 --concurrency 16 --requests 1000 --mode lcfx \\
        --sharer-pid $(pgrep -f 'serve sharer') --receiver-pid $(pgrep -f 'serve receiver') --out runs/load

`--concurrency` clients each send handoffs one after another until `--requests` have been
sent, through one channel (HTTP/2 streams, as a real client would). Reported: throughput
(successful handoffs per second), client-side latency and time to first token (p50/p95/p99),
errors by gRPC status code, the queue time the services report (StageTimings.queue), and,
for services on this machine (`--sharer-pid`, `--receiver-pid`), their RSS and threads at the
start, at the end and at their peak (sampled every 0.2 s), so a leak shows as drift.
Writes OUT/load.json and OUT/load_latency.png (latency over time, errors marked).

The client retries as `lcflow handoff` does (`--retries`, gRPC's retry policy): errors are
what is left after that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lcflow.client import MODE_NAMES, HandoffClient
from lcflow.core.errors import UsageError
from lcflow.serving.security import add_client_security_flags, client_security_from_args

CONTEXT = (
    "Mira Volkov lives in Oslo and works as a baker. Lior Senn plays the violin and owns a cat. "
    "Ada Brook's mentor is Lior Senn; she lives in Porto and collects old maps."
)
PROMPT = "Where does Mira Volkov live?"


def register(subparsers) -> None:

    p = subparsers.add_parser(
        "load",
        help="many concurrent handoffs against running services: throughput, latency, errors, RSS",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sharer", required=True, help="the sharer's address, HOST:PORT")
    p.add_argument("--concurrency", type=int, default=16, help="handoffs in flight at once (default 16)")
    p.add_argument("--requests", type=int, default=1000, help="handoffs in all (default 1000)")
    p.add_argument("--mode", choices=list(MODE_NAMES), default="lcfx", help="handoff mode (default lcfx)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default 8)")
    p.add_argument("--context", default=CONTEXT, help="the sharer's context (default: a short fixed text)")
    p.add_argument("--prompt", default=PROMPT, help="the receiver's prompt")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each handoff, seconds")
    p.add_argument("--retries", type=int, default=3, help="gRPC retries of UNAVAILABLE / RESOURCE_EXHAUSTED")
    p.add_argument("--sharer-pid", type=int, help="the sharer's process id, to sample its RSS (same machine)")
    p.add_argument("--receiver-pid", type=int, help="the receiver's process id, to sample its RSS")
    p.add_argument("--out", type=Path, help="directory for load.json and load_latency.png")
    add_client_security_flags(p)
    p.set_defaults(func=run)


@dataclass
class Outcome:
    started_s: float  # since the run began
    code: str  # gRPC status name, OK for success
    latency_ms: float
    ttft_ms: float | None = None
    queue_ms: float | None = None


@dataclass
class ProcessSample:
    rss_kb: int
    threads: int


@dataclass
class ProcessUsage:
    """RSS and threads of one local process over the run.

    `series` keeps (seconds since the start, RSS kB) of every sample, so warm-up (growth that
    stops) can be told from a leak (growth that goes on): `summary` reports the growth over the
    second half of the run beside the drift from start to end.
    """

    pid: int
    start: ProcessSample | None = None
    end: ProcessSample | None = None
    peak_rss_kb: int = 0
    peak_threads: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)

    def sample(self, at_s: float = 0.0) -> ProcessSample | None:
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
            )
        except OSError:
            return None
        found = ProcessSample(int(fields["VmRSS"].split()[0]), int(fields["Threads"]))
        self.peak_rss_kb = max(self.peak_rss_kb, found.rss_kb)
        self.peak_threads = max(self.peak_threads, found.threads)
        self.series.append((at_s, found.rss_kb))
        return found

    def summary(self, points: int = 100) -> dict:
        """Start/end/peak, the drift, the second half's growth, and ~`points` of the series in MiB."""
        drift = (self.end.rss_kb - self.start.rss_kb) / self.start.rss_kb if self.start and self.end else None
        half = self.series[len(self.series) // 2][1] if self.series else None
        second_half = (self.end.rss_kb - half) / half if half and self.end else None
        step = max(1, len(self.series) // points)
        picked = self.series[::step] + ([self.series[-1]] if (len(self.series) - 1) % step else [])
        kept = [(round(t, 1), round(kb / 1024, 1)) for t, kb in picked]
        fields = {k: v for k, v in asdict(self).items() if k != "series"}
        return {**fields, "rss_drift": drift, "rss_growth_second_half": second_half, "rss_mib_series": kept}


@dataclass
class LoadResult:
    config: dict
    wall_s: float
    outcomes: list[Outcome]
    processes: dict[str, ProcessUsage] = field(default_factory=dict)

    def summary(self) -> dict:
        ok = [o for o in self.outcomes if o.code == "OK"]
        errors: dict[str, int] = {}
        for o in self.outcomes:
            if o.code != "OK":
                errors[o.code] = errors.get(o.code, 0) + 1
        return {
            "requests": len(self.outcomes),
            "ok": len(ok),
            "errors": errors,
            "wall_s": self.wall_s,
            "throughput_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "latency_ms": percentiles([o.latency_ms for o in ok]),
            "ttft_ms": percentiles([o.ttft_ms for o in ok if o.ttft_ms is not None]),
            "queue_ms": percentiles([o.queue_ms for o in ok if o.queue_ms is not None]),
            "processes": {role: usage.summary() for role, usage in self.processes.items()},
        }


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def run_load(
    target: str,
    concurrency: int,
    requests: int,
    mode: str = "lcfx",
    max_new_tokens: int = 8,
    context: str = CONTEXT,
    prompt: str = PROMPT,
    timeout_s: float = 120.0,
    retries: int = 3,
    security=None,
    pids: dict[str, int] | None = None,
) -> LoadResult:
    import grpc

    if concurrency < 1 or requests < 1:
        raise ValueError("--concurrency and --requests must be at least 1")
    client = HandoffClient(target, timeout_s=timeout_s, security=security, retries=retries)
    processes = {role: ProcessUsage(pid) for role, pid in (pids or {}).items() if pid}
    for usage in processes.values():
        usage.start = usage.sample()
    remaining = iter(range(requests))
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    began = time.perf_counter()
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(0.2):
            for usage in processes.values():
                usage.sample(time.perf_counter() - began)

    def worker() -> None:
        while True:
            with lock:
                if next(remaining, None) is None:
                    return
            start = time.perf_counter()
            first = summary = None
            code = "OK"
            try:
                for event in client.stream(prompt, mode=mode, context=context, max_new_tokens=max_new_tokens):
                    if event.HasField("text"):
                        first = first or time.perf_counter()
                    else:
                        summary = event.summary
            except grpc.RpcError as err:
                code = err.code().name
            end = time.perf_counter()
            outcome = Outcome(
                started_s=start - began,
                code=code,
                latency_ms=(end - start) * 1000,
                ttft_ms=(first - start) * 1000 if first else None,
                queue_ms=summary.timings.queue
                if summary is not None and summary.timings.HasField("queue")
                else None,
            )
            with lock:
                outcomes.append(outcome)

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="load") as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall_s = time.perf_counter() - began
    done.set()
    watcher.join()
    for usage in processes.values():
        usage.end = usage.sample(wall_s)
    client.close()
    config = {
        "sharer": target,
        "concurrency": concurrency,
        "requests": requests,
        "mode": mode,
        "max_new_tokens": max_new_tokens,
        "timeout_s": timeout_s,
        "retries": retries,
    }
    return LoadResult(config, wall_s, sorted(outcomes, key=lambda o: o.started_s), processes)


def write_outputs(result: LoadResult, out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "load.json", out / "load_latency.png"
    record = {
        "config": result.config,
        "summary": result.summary(),
        "outcomes": [asdict(o) for o in result.outcomes],
    }
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    ok = [o for o in result.outcomes if o.code == "OK"]
    bad = [o for o in result.outcomes if o.code != "OK"]
    ax.scatter([o.started_s for o in ok], [o.latency_ms for o in ok], s=6, label="total")
    ax.scatter(
        [o.started_s for o in ok if o.ttft_ms], [o.ttft_ms for o in ok if o.ttft_ms], s=6, label="first token"
    )
    if bad:
        ax.scatter(
            [o.started_s for o in bad], [o.latency_ms for o in bad], s=14, marker="x", c="red", label="error"
        )
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("ms")
    c = result.config
    ax.set_title(f"{c['requests']} {c['mode']} handoffs at concurrency {c['concurrency']}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def format_summary(summary: dict) -> str:
    def line(name: str, values: dict) -> str:
        if not values:
            return f"  {name:<14} -"
        return f"  {name:<14} p50 {values['p50']:8.1f}  p95 {values['p95']:8.1f}  p99 {values['p99']:8.1f} ms"

    lines = [
        f"{summary['ok']}/{summary['requests']} ok in {summary['wall_s']:.1f} s: "
        f"{summary['throughput_per_s']:.2f} handoffs/s",
        line("latency", summary["latency_ms"]),
        line("first token", summary["ttft_ms"]),
        line("queue", summary["queue_ms"]),
        "  errors         " + (", ".join(f"{k} {v}" for k, v in sorted(summary["errors"].items())) or "none"),
    ]
    for role, usage in summary["processes"].items():
        if usage["start"] and usage["end"]:
            lines.append(
                f"  {role:<14} RSS {usage['start']['rss_kb'] / 1024:.0f} -> {usage['end']['rss_kb'] / 1024:.0f} MiB "
                f"(peak {usage['peak_rss_kb'] / 1024:.0f}, drift {usage['rss_drift']:+.1%}, "
                f"second half {usage['rss_growth_second_half'] or 0:+.1%}), threads "
                f"{usage['start']['threads']} -> {usage['end']['threads']}"
            )
    return "\n".join(lines)


def run(args) -> int:

    if args.concurrency < 1 or args.requests < 1:
        raise UsageError("--concurrency and --requests must be at least 1")
    result = run_load(
        args.sharer,
        args.concurrency,
        args.requests,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        context=args.context,
        prompt=args.prompt,
        timeout_s=args.timeout,
        retries=args.retries,
        security=client_security_from_args(args),
        pids={"sharer": args.sharer_pid, "receiver": args.receiver_pid},
    )
    summary = result.summary()
    print(format_summary(summary))
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"written: {path}")
    return 0 if not summary["errors"] else 1
