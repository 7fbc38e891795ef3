"""Faults with real processes and sockets: each service is `lcflow serve ROLE` in its own process.

On loopback: the receiver killed mid-stream, the sharer killed mid-stream, a client that stops
reading, a client that cancels, and 200 faulty requests (RSS and threads must stay flat).
Across two network namespaces (needs root and iproute2; skipped with the reason otherwise): the
link cut mid-handoff, and a slow lossy link (`tc netem`). In each, the client gets a clear status
within its deadline, the surviving service keeps serving, and a retried handoff succeeds.

Keepalive is set to 2 s (LCFLOW_KEEPALIVE_S), so a dead peer is noticed in seconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port
from service_helpers import latent_stream, service_process_env, stop_processes

from lcflow.adapter import LatentAdapter
from lcflow.bench.netns import two_hosts, why_netns_unavailable
from lcflow.client import HandoffClient
from lcflow.core.kv import model_identity
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.testing.tiny import load_tiny

pytestmark = pytest.mark.slow

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."
PROMPT = "Where does Mira Volkov live?"
STARTUP_S = 120.0
KEEPALIVE_S = "2"


def clean_env(**settings: str) -> dict[str, str]:
    """The environment of the service processes this module starts (service_process_env)."""
    return service_process_env(KEEPALIVE_S, "2", **settings)


@pytest.fixture(scope="module")
def tiny_lcfx(tiny_dir, tmp_path_factory):
    # A 16-layer receiver: a 2-layer one writes the long handoffs' 2,000 tokens in ~2 s on a fast
    # core, before keepalive (~3 x KEEPALIVE_S) notices a cut link, leaving nothing to cancel.
    sharer_dir, receiver_dir = tiny_dir("llama", 300, 3), tiny_dir("gemma3", 400, 16)
    s, r = load_tiny(sharer_dir), load_tiny(receiver_dir)
    adapter = LatentAdapter.for_models("lcfx", model_identity(*s), model_identity(*r), bottleneck=16, slots=4)
    torch.manual_seed(3)
    return sharer_dir, receiver_dir, adapter.save_pretrained(tmp_path_factory.mktemp("faults-adapter"))


def health(target: str, service: str) -> int | None:
    channel = grpc.insecure_channel(target)
    try:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            .status
        )
    except grpc.RpcError:
        return None
    finally:
        channel.close()


class Services:
    """A receiver and a sharer process on loopback ports, each restartable on the same port."""

    def __init__(self, tiny_lcfx, log_dir: Path, host: str = "127.0.0.1", **extra: str):
        self.sharer_dir, self.receiver_dir, self.adapter_dir = tiny_lcfx
        self.log_dir, self.host, self.extra = log_dir, host, extra
        self.ports = {"receiver": free_port(), "sharer": free_port()}
        self.processes: dict[str, subprocess.Popen] = {}
        self.starts = 0

    def env(self, role: str) -> dict[str, str]:
        settings = {
            "LCFLOW_MODEL": str(self.receiver_dir if role == "receiver" else self.sharer_dir),
            "LCFLOW_ADAPTER": str(self.adapter_dir),
            "LCFLOW_HOST": self.host,
            "LCFLOW_PORT": str(self.ports[role]),
            "LCFLOW_DEVICE": "cpu",
            **self.extra,
        }
        if role == "sharer":
            settings["LCFLOW_RECEIVER"] = f"{self.host}:{self.ports['receiver']}"
        return clean_env(**settings)

    def target(self, role: str) -> str:
        return f"{self.host}:{self.ports[role]}"

    def start(self, role: str) -> None:
        self.starts += 1
        log = open(self.log_dir / f"{role}-{self.starts}.log", "w")  # noqa: SIM115 (the process owns it)
        self.processes[role] = subprocess.Popen(
            [sys.executable, "-m", "lcflow.cli", "serve", role],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(role),
        )
        service = "lcflow.v1.Receiver" if role == "receiver" else "lcflow.v1.Sharer"
        deadline = time.monotonic() + STARTUP_S
        while health(self.target(role), service) != health_pb2.HealthCheckResponse.SERVING:
            assert self.processes[role].poll() is None, (
                self.log_dir / f"{role}-{self.starts}.log"
            ).read_text()[-2000:]
            assert time.monotonic() < deadline, f"{role} not SERVING after {STARTUP_S} s"
            time.sleep(0.3)

    def kill(self, role: str) -> None:
        process = self.processes[role]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def log(self, role: str) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob(f"{role}-*.log")))

    def stop(self) -> None:
        stop_processes(self.processes.values())


@pytest.fixture(scope="module")
def services(tiny_lcfx, tmp_path_factory):
    running = Services(tiny_lcfx, tmp_path_factory.mktemp("fault-logs"))
    running.start("receiver")
    running.start("sharer")
    yield running
    running.stop()


def long_handoff(target: str, timeout: float = 60) -> tuple[HandoffClient, object]:
    """A handoff that generates for a long time (2000 tokens); returns (client, call) after its first text."""
    client = HandoffClient(target, retries=0)  # untraced: the call keeps its cancel()
    request = client.request(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=2000)
    call = client.stub.Handoff(request, timeout=timeout)
    assert next(call).HasField("text")
    return client, call


def ended(call) -> tuple[grpc.StatusCode, float]:
    """(status, seconds) until the call ends, reading whatever it still sends."""
    started = time.monotonic()
    try:
        for _ in call:
            pass
    except grpc.RpcError as err:
        return err.code(), time.monotonic() - started
    return grpc.StatusCode.OK, time.monotonic() - started


def handoff_within(target: str, seconds: float) -> pb.HandoffSummary:
    """A handoff that succeeds within `seconds`, retried (gRPC's retries, and new attempts here)."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        client = HandoffClient(target, timeout_s=30, retries=3)
        try:
            return client.handoff(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=3).summary
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
            time.sleep(0.5)
        finally:
            client.close()
    pytest.fail(f"no handoff succeeded within {seconds} s; last: {last}")


def test_receiver_killed_mid_stream(services):
    channel, call = long_handoff(services.target("sharer"))
    services.kill("receiver")
    code, seconds = ended(call)
    channel.close()
    assert code == grpc.StatusCode.UNAVAILABLE and seconds < 10, (code, seconds)
    assert services.processes["sharer"].poll() is None  # the sharer survives
    services.start("receiver")
    assert handoff_within(services.target("sharer"), 30).tokens.generated > 0


def test_sharer_killed_mid_stream(services):
    cancelled_before = services.log("receiver").count("generation cancelled")
    channel, call = long_handoff(services.target("sharer"))
    services.kill("sharer")
    code, seconds = ended(call)
    channel.close()
    assert code == grpc.StatusCode.UNAVAILABLE and seconds < 10, (code, seconds)
    # the receiver stops generating for the dead sharer, and keeps serving
    deadline = time.monotonic() + 15
    while services.log("receiver").count("generation cancelled") == cancelled_before:
        assert time.monotonic() < deadline, "the receiver kept generating for a dead sharer"
        time.sleep(0.2)
    request = pb.LatentMessage(
        request=pb.ReceiverRequest(prompt_text=PROMPT, mode=pb.NONE, generation={"max_new_tokens": 2})
    )
    receiver = pb_grpc.ReceiverStub(grpc.insecure_channel(services.target("receiver")))
    assert list(receiver.Receive(iter([request]), timeout=30))[-1].HasField("summary")
    services.start("sharer")
    assert handoff_within(services.target("sharer"), 30).tokens.generated > 0


def test_a_client_that_stops_reading_ends_at_its_deadline(services):
    channel, call = long_handoff(services.target("sharer"), timeout=4)
    time.sleep(5)  # reads nothing more, does not cancel
    code, seconds = ended(call)
    channel.close()
    # buffered text may still come, then the deadline's status (or the end, had it all fitted)
    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK) and seconds < 5
    assert handoff_within(services.target("sharer"), 10).tokens.generated > 0


def test_a_client_that_cancels_stops_the_receiver(services):
    cancelled_before = services.log("receiver").count("generation cancelled")
    channel, call = long_handoff(services.target("sharer"))
    call.cancel()
    channel.close()
    deadline = time.monotonic() + 10
    while services.log("receiver").count("generation cancelled") == cancelled_before:
        assert time.monotonic() < deadline, "the receiver kept generating after the client cancelled"
        time.sleep(0.2)
    assert handoff_within(services.target("sharer"), 10).tokens.generated > 0


def process_usage(pid: int) -> tuple[int, int]:
    """(RSS in kB, threads) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


def faulty_streams(services, tiny_pair, adapter_dir) -> list[list[pb.LatentMessage]]:
    """Streams the receiver must refuse: truncated, corrupted, out of order, bad header."""
    from lcflow.serving.loading import SharerEngine

    (ms, ts), _ = tiny_pair
    valid = latent_stream(SharerEngine.from_loaded(ms, ts, str(adapter_dir)), CONTEXT, PROMPT)
    flipped = list(valid)
    chunk = pb.LatentMessage()
    chunk.CopyFrom(flipped[3])
    chunk.chunk.payload = bytes([chunk.chunk.payload[0] ^ 1]) + chunk.chunk.payload[1:]
    chunk.chunk.crc32 = zlib.crc32(chunk.chunk.payload) ^ 1
    flipped[3] = chunk
    after_trailer = [*valid, valid[2]]
    return [valid[:-2], flipped, after_trailer, valid[:2], [valid[0], valid[0]]]


def test_rss_and_threads_stay_flat_over_200_faulty_requests(services, tiny_pair, tiny_lcfx):
    streams = faulty_streams(services, tiny_pair, tiny_lcfx[2])
    target = services.target("receiver")
    pid = services.processes["receiver"].pid

    def one_round(count: int) -> None:
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.ReceiverStub(channel)
        for i in range(count):
            try:
                list(stub.Receive(iter(streams[i % len(streams)]), timeout=10))
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT), err
            else:
                pytest.fail("a faulty stream was accepted")
        channel.close()

    one_round(40)  # warm-up: buffers, caches and the thread pool reach their steady size
    rss_before, threads_before = process_usage(pid)
    one_round(200)
    rss_after, threads_after = process_usage(pid)
    assert rss_after <= rss_before * 1.10, (rss_before, rss_after)
    assert threads_after <= threads_before * 1.10 + 1, (threads_before, threads_after)
    assert handoff_within(services.target("sharer"), 10).tokens.generated > 0


# --- two hosts: a cut link, a slow lossy link --------------------------------------------------------


@pytest.fixture(scope="module")
def hosts():
    why = why_netns_unavailable()
    if why:
        print(f"SKIP link fault tests: {why}")
        pytest.skip(f"link fault tests need network namespaces: {why}")
    with two_hosts("lcff", ("10.213.8.1", "10.213.8.2")) as pair:
        yield pair


class HostServices(Services):
    """The sharer on host A, the receiver on host B; the client runs on A."""

    def __init__(self, tiny_lcfx, log_dir, hosts):
        super().__init__(tiny_lcfx, log_dir, host="0.0.0.0")
        self.sharer_host, self.receiver_host = hosts
        self.ports = {"receiver": 50052, "sharer": 50051}

    def env(self, role):
        env = super().env(role)
        if role == "sharer":
            env["LCFLOW_RECEIVER"] = f"{self.receiver_host.address}:{self.ports['receiver']}"
        return env

    def start(self, role):
        self.starts += 1
        host = self.receiver_host if role == "receiver" else self.sharer_host
        log = open(self.log_dir / f"{role}-{self.starts}.log", "w")  # noqa: SIM115
        self.processes[role] = host.popen(
            [sys.executable, "-m", "lcflow.cli", "serve", role],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(role),
        )


CLIENT = r"""
import sys, time, grpc
from lcflow.client import HandoffClient
target, mode, tokens, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 60
while True:  # wait until both services answer: a first handoff that succeeds
    try:
        HandoffClient(target, timeout_s=20).handoff("Where?", mode="none", context="x", max_new_tokens=1)
        break
    except grpc.RpcError:
        assert time.monotonic() < deadline, "services never became ready"
        time.sleep(0.5)
client = HandoffClient(target, retries=0)
request = client.request("Where does Mira Volkov live?", mode=mode, context="Mira lives in Oslo.", max_new_tokens=tokens)
call = client.stub.Handoff(request, timeout=timeout)
first = next(call)
print("FIRST", flush=True)
sys.stdin.readline()  # the test cuts the link now, then says go
started = time.monotonic()
try:
    events = list(call)
    print("STATUS OK", round(time.monotonic() - started, 2), events[-1].summary.timings.time_to_first_token, flush=True)
except grpc.RpcError as err:
    print("STATUS", err.code().name, round(time.monotonic() - started, 2), flush=True)
"""


def run_client(
    host, target: str, mode: str, tokens: int, timeout: float, between=None
) -> tuple[str, float, str]:
    """Run a handoff from `host`; `between()` runs after its first text event. Returns (status, s, ttft)."""
    process = host.popen(
        [sys.executable, "-c", CLIENT, target, mode, str(tokens), str(timeout)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    line = process.stdout.readline()
    assert line.strip() == "FIRST", line + process.stderr.read()[-2000:]
    if between is not None:
        between()
    process.stdin.write("go\n")
    process.stdin.flush()
    out, err = process.communicate(timeout=timeout + 30)
    words = out.split()
    assert words and words[0] == "STATUS", out + err[-2000:]
    return words[1], float(words[2]), (words[3] if len(words) > 3 else "")


@pytest.fixture(scope="module")
def host_services(hosts, tiny_lcfx, tmp_path_factory):
    running = HostServices(tiny_lcfx, tmp_path_factory.mktemp("host-fault-logs"), hosts)
    running.start("receiver")
    running.start("sharer")
    yield running
    running.stop()


def test_a_cut_link_ends_the_handoff_within_seconds(host_services):
    a, b = host_services.sharer_host, host_services.receiver_host
    target = f"{a.address}:{host_services.ports['sharer']}"
    cancelled_before = host_services.log("receiver").count("generation cancelled")
    status, seconds, _ = run_client(
        a, target, "lcfx", 2000, 60, between=lambda: b.ip("link", "set", b.link, "down")
    )
    # keepalive (2 s) notices the dead link long before the 60 s deadline
    assert status == "UNAVAILABLE" and seconds < 15, (status, seconds)
    deadline = time.monotonic() + 20  # the receiver's own keepalive stops its generation
    while host_services.log("receiver").count("generation cancelled") == cancelled_before:
        assert time.monotonic() < deadline, "the receiver kept generating across a cut link"
        time.sleep(0.3)
    b.ip("link", "set", b.link, "up")
    status, _, _ = run_client(a, target, "lcfx", 3, 30)  # waits for readiness, retried by gRPC
    assert status == "OK"


def test_a_slow_lossy_link_still_completes(host_services):
    a, b = host_services.sharer_host, host_services.receiver_host
    added = [
        host.tc("qdisc", "add", "dev", host.link, "root", "netem", "delay", "40ms", "loss", "3%")
        for host in (a, b)
    ]
    if any(done.returncode != 0 for done in added):
        reason = "; ".join(done.stderr.strip() for done in added if done.returncode)
        print(f"SKIP slow lossy link: tc netem refused: {reason}")
        pytest.skip(f"tc netem is not available here: {reason}")
    try:
        target = f"{a.address}:{host_services.ports['sharer']}"
        status, _, ttft = run_client(a, target, "lcfx", 4, 60)
        assert status == "OK"
        assert float(ttft) >= 80  # at least the round trip to the receiver (2 x 40 ms)
    finally:
        for host in (a, b):
            host.tc("qdisc", "del", "dev", host.link, "root")
