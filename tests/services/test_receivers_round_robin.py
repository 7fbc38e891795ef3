"""Several receivers behind one sharer: `--receiver` takes a list of addresses or a dns:/// name,
and the sharer's channel balances handoffs round-robin over the receivers whose grpc.health.v1
status is SERVING (gRPC's client-side health checking), skipping a dead or NOT_SERVING one and
using it again once it is back.

The --receiver forms and their refusals; receivers in this process (one set NOT_SERVING is
skipped; mutual TLS and a token over a list); and real `lcflow serve receiver` processes, one
of them killed mid-run: the handoff it was serving may end UNAVAILABLE, every later one succeeds
on the other, and the restarted one gets handoffs again.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port, tiny_adapter_dir
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import mutual_tls_server_settings, service_process_env, stop_processes

from lcflow.client import HandoffClient
from lcflow.serving.config import ServiceConfig, add_service_flags, config_from_args, parse_receivers
from lcflow.serving.telemetry import make_tracer_provider

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin and owns a cat."
PROMPT = "Where does Mira Volkov live?"


def receiver_name(port: int) -> str:
    """How a receiver on this host names itself in HandoffSummary.receiver."""
    return f"{socket.gethostname()}:{port}"


# --- the --receiver forms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, target, authority",
    [
        ("127.0.0.1:50052", "127.0.0.1:50052", ""),  # one receiver: as before
        ("receiver:50052", "receiver:50052", ""),  # a name: gRPC's DNS resolver, as before
        ("dns:///rx.lcflow.svc.cluster.local:50052", "dns:///rx.lcflow.svc.cluster.local:50052", ""),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1", ""),  # a gRPC target: as it is
        ("127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2", "127.0.0.1"),
        (" localhost:1 , localhost:2 ", "ipv4:127.0.0.1:1,127.0.0.1:2", "localhost"),
        ("10.0.0.1:50052,10.0.0.2:50052", "ipv4:10.0.0.1:50052,10.0.0.2:50052", ""),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2", "[::1]"),
        ("10.0.0.1:50052,", "10.0.0.1:50052", ""),  # a list of one is one receiver
    ],
)
def test_receiver_forms_become_grpc_targets(text, target, authority):
    parsed = parse_receivers(text)
    assert (parsed.target, parsed.authority) == (target, authority)


@pytest.mark.parametrize(
    "text, says",
    [
        ("receiver-a:50052,receiver-b:50052", "dns:///NAME:PORT"),  # names go stale: refused
        ("10.0.0.1:50052,[::1]:50052", "mixes IPv4 and IPv6"),
        ("10.0.0.1,10.0.0.2:50052", "is not HOST:PORT"),
        ("10.0.0.1:50052,10.0.0.1:99999", "out of range"),
        ("localhost:50052,127.0.0.1:50052", "twice"),
    ],
)
def test_lists_that_cannot_work_are_refused_saying_what_to_give(text, says):
    with pytest.raises(ValueError, match=says.replace("/", ".").replace(":", ".")):
        parse_receivers(text)


def test_the_sharer_refuses_a_bad_list_at_start_in_one_line(monkeypatch):
    import argparse

    monkeypatch.setenv("LCFLOW_RECEIVER", "127.0.0.1:50052,127.0.0.1:50053")
    parser = argparse.ArgumentParser()
    add_service_flags(parser, "sharer")
    config = config_from_args("sharer", parser.parse_args(["--model", "tiny"]))
    assert config.receivers().target == "ipv4:127.0.0.1:50052,127.0.0.1:50053"
    with pytest.raises(SystemExit, match="^sharer: --receiver lists the host name 'a'"):
        config_from_args("sharer", parser.parse_args(["--model", "tiny", "--receiver", "a:1,b:1"]))


def test_tls_to_receivers_on_different_hosts_needs_one_server_name():
    tls = {"receiver_tls_ca": "ca.pem"}  # files are read when the channel is made, not here
    with pytest.raises(ValueError, match="--receiver-tls-server-name"):
        ServiceConfig("sharer", model="tiny", receiver="10.0.0.1:50052,10.0.0.2:50052", **tls)
    ServiceConfig(
        "sharer",
        model="tiny",
        receiver="10.0.0.1:50052,10.0.0.2:50052",
        receiver_tls_server_name="receivers.internal",
        **tls,
    )
    ServiceConfig("sharer", model="tiny", receiver="localhost:50052,localhost:50053", **tls)  # one host
    ServiceConfig("sharer", model="tiny", receiver="10.0.0.1:50052,10.0.0.2:50052")  # plaintext


# --- receivers in this process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_pair, tmp_path_factory):
    return tiny_adapter_dir(tiny_pair, tmp_path_factory.mktemp("rr-adapter"))


@contextlib.contextmanager
def two_receivers_one_sharer(tiny_pair, adapter_dir, host="127.0.0.1", receiver=None, sharer=None):
    """Two receivers and a sharer whose --receiver lists both; yields (sharer target, [running
    receivers], [their ports], sharer service, span exporter)."""
    from lcflow.serving.loading import ReceiverEngine, SharerEngine
    from lcflow.serving.receiver import serve as serve_receiver
    from lcflow.serving.sharer import serve as serve_sharer

    (ms, ts), (mr, tr) = tiny_pair
    spans = InMemorySpanExporter()
    ports = [free_port(), free_port()]
    receivers = []
    try:
        for port in ports:
            receivers.append(
                serve_receiver(
                    ServiceConfig("receiver", model="tiny", port=port, **(receiver or {})),
                    make_tracer_provider("lcflow-receiver", spans),
                    ReceiverEngine.from_loaded(mr, tr, str(adapter_dir)),
                )[0]
            )
        sharer_port = free_port()
        sharer_running, sharer_service = serve_sharer(
            ServiceConfig(
                "sharer",
                model="tiny",
                port=sharer_port,
                receiver=",".join(f"{host}:{port}" for port in ports),
                **(sharer or {}),
            ),
            make_tracer_provider("lcflow-sharer", spans),
            SharerEngine.from_loaded(ms, ts, str(adapter_dir)),
        )
        try:
            yield f"127.0.0.1:{sharer_port}", receivers, ports, sharer_service, spans
        finally:
            sharer_running.stop(0)
    finally:
        for running in receivers:
            running.stop(0)


def served_by(client: HandoffClient, mode: str = "lcfx") -> str:
    return client.handoff(PROMPT, mode=mode, context=CONTEXT, max_new_tokens=2).summary.receiver


def serve_until_all_seen(client: HandoffClient, names: set[str], modes=("lcfx",)) -> list[str]:
    """Handoffs until every receiver has served one (the first may come before the channel has
    connected to all of them); returns who served each."""
    seen: list[str] = []
    while set(seen) != names:
        assert len(seen) < 12, f"not every receiver got handoffs: {seen}"
        seen.append(served_by(client, modes[len(seen) % len(modes)]))
    return seen


def test_handoffs_alternate_and_a_receiver_not_serving_is_skipped(tiny_pair, adapter_dir):
    with two_receivers_one_sharer(tiny_pair, adapter_dir) as (sharer, receivers, ports, _, spans):
        names = [receiver_name(port) for port in ports]
        client = HandoffClient(sharer, timeout_s=30, retries=0)
        try:
            serve_until_all_seen(client, set(names), ("lcfx", "none", "text"))
            seen = [served_by(client) for _ in range(4)]
            assert seen[0] != seen[1] and seen[:2] == seen[2:], seen  # round-robin: they alternate
            # which receiver answered is in the sharer's Handoff span too
            handoff_spans = [s for s in spans.get_finished_spans() if s.name.endswith("Sharer/Handoff")]
            assert {s.attributes.get("lcflow.receiver") for s in handoff_spans} == set(names)

            receivers[0].set_serving(False)  # e.g. shutting down: no new handoffs for it
            deadline, run = time.monotonic() + 10, 0
            while run < 4:  # the sharer hears of it within moments (a health Watch stream)
                assert time.monotonic() < deadline, "handoffs still go to the NOT_SERVING receiver"
                run = run + 1 if served_by(client) == names[1] else 0

            receivers[0].set_serving(True)
            deadline = time.monotonic() + 10
            while served_by(client) != names[0]:
                assert time.monotonic() < deadline, "the receiver SERVING again gets no handoffs"
        finally:
            client.close()


def test_mutual_tls_and_a_token_over_a_list_of_receivers(tiny_pair, adapter_dir, tmp_path):
    receiver = mutual_tls_server_settings(tmp_path, "for-the-receivers")
    sharer = {
        "receiver_tls_ca": str(tmp_path / "ca.pem"),
        "receiver_tls_client_cert": str(tmp_path / "client.pem"),
        "receiver_tls_client_key": str(tmp_path / "client-key.pem"),
        "receiver_auth_token_file": str(tmp_path / "token"),
    }
    # localhost,localhost: dialled as 127.0.0.1, the certificates checked against "localhost"
    with two_receivers_one_sharer(tiny_pair, adapter_dir, "localhost", receiver, sharer) as running:
        target, _, ports, sharer_service, _ = running
        names = {receiver_name(port) for port in ports}
        client = HandoffClient(target, timeout_s=30, retries=0)
        try:
            serve_until_all_seen(client, names)
            sharer_service.reload_receiver_credentials()  # SIGHUP: a new channel over the same list
            serve_until_all_seen(client, names)
        finally:
            client.close()


# --- receiver processes, one killed mid-run --------------------------------------------------------


def process_env(**settings: str) -> dict[str, str]:
    return service_process_env("2", "1", **settings)


def health(port: int) -> int | None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        request = health_pb2.HealthCheckRequest(service="lcflow.v1.Receiver")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
    except grpc.RpcError:
        return None
    finally:
        channel.close()


class ReceiverProcesses:
    """`lcflow serve receiver` processes on loopback ports, each restartable on its port."""

    def __init__(self, model_dir, adapter_dir, log_dir, count: int = 2):
        self.model_dir, self.adapter_dir, self.log_dir = model_dir, adapter_dir, log_dir
        self.ports = [free_port() for _ in range(count)]
        self.processes: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, object] = {}

    def start(self, *ports: int) -> None:
        for port in ports:  # all at once: they load their models side by side
            log = self.logs[port] = open(self.log_dir / f"receiver-{port}.log", "a")  # noqa: SIM115
            env = process_env(
                LCFLOW_MODEL=str(self.model_dir),
                LCFLOW_ADAPTER=str(self.adapter_dir),
                LCFLOW_PORT=str(port),
                LCFLOW_DEVICE="cpu",
            )
            self.processes[port] = subprocess.Popen(
                [sys.executable, "-m", "lcflow.cli", "serve", "receiver"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 120
        for port in ports:
            while health(port) != health_pb2.HealthCheckResponse.SERVING:
                assert self.processes[port].poll() is None, (
                    self.log_dir / f"receiver-{port}.log"
                ).read_text()
                assert time.monotonic() < deadline, f"receiver on {port} not SERVING after 120 s"
                time.sleep(0.3)

    def kill(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(timeout=10)

    def stop(self) -> None:
        stop_processes(self.processes.values())
        for log in self.logs.values():
            log.close()


class Watched:
    """A long handoff read to its end in a thread: its status and when it ended."""

    def __init__(self, client: HandoffClient):
        request = client.request(PROMPT, mode="lcfx", context=CONTEXT, max_new_tokens=2000)
        self.call = client.stub.Handoff(request, timeout=60)
        assert next(self.call).HasField("text")  # generating
        self.code: grpc.StatusCode | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for _ in self.call:
                pass
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.code = err.code()
        self.ended.set()


@pytest.mark.slow
def test_two_receiver_processes_one_killed_mid_run(tiny_dir, tmp_path):
    from lcflow.adapter import LatentAdapter
    from lcflow.core.kv import model_identity
    from lcflow.serving.loading import SharerEngine
    from lcflow.serving.sharer import serve as serve_sharer
    from lcflow.testing.tiny import load_tiny

    # A 16-layer receiver: generating 2,000 tokens takes long enough to be killed in the middle.
    sharer_dir, receiver_dir = tiny_dir("llama", 300, 3), tiny_dir("gemma3", 400, 16)
    (ms, ts), (mr, tr) = load_tiny(sharer_dir), load_tiny(receiver_dir)
    torch.manual_seed(3)
    adapter = LatentAdapter.for_models(
        "lcfx", model_identity(ms, ts), model_identity(mr, tr), bottleneck=16, slots=4
    )
    adapter_dir = adapter.save_pretrained(tmp_path / "adapter")
    receivers = ReceiverProcesses(receiver_dir, adapter_dir, tmp_path)
    first, second = receivers.ports
    names = {port: receiver_name(port) for port in receivers.ports}
    sharer_port = free_port()
    try:
        receivers.start(first, second)
        sharer_running, _ = serve_sharer(
            ServiceConfig(
                "sharer", model="tiny", port=sharer_port, receiver=f"127.0.0.1:{first},127.0.0.1:{second}"
            ),
            make_tracer_provider("lcflow-sharer", InMemorySpanExporter()),
            SharerEngine.from_loaded(ms, ts, str(adapter_dir)),
        )
        client = HandoffClient(f"127.0.0.1:{sharer_port}", timeout_s=30, retries=0)
        try:
            serve_until_all_seen(client, set(names.values()))

            # One long handoff on each receiver (round-robin), then one receiver dies.
            in_flight = [Watched(client), Watched(client)]
            receivers.kill(first)
            killed_at = time.monotonic()
            # the handoff the dead receiver was serving ends UNAVAILABLE, in seconds; no failover
            while not any(w.ended.is_set() for w in in_flight):
                assert time.monotonic() < killed_at + 10, "the dead receiver's handoff did not end"
                time.sleep(0.05)
            codes = [w.code for w in in_flight if w.ended.is_set()]
            assert grpc.StatusCode.UNAVAILABLE in codes and set(codes) <= {
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.OK,  # the other one, had it finished already
            }, codes
            for watched in in_flight:
                watched.call.cancel()  # the survivor: not needed any more

            # every later handoff succeeds, on the receiver that is left
            later = [served_by(client) for _ in range(6)]
            assert later == [names[second]] * 6, later
            assert time.monotonic() - killed_at < 30

            # restarted on its port, it is found again (reconnect backoff at most 5 s) and used
            receivers.start(first)
            deadline = time.monotonic() + 20
            while served_by(client) != names[first]:
                assert time.monotonic() < deadline, "the restarted receiver gets no handoffs"
        finally:
            client.close()
            sharer_running.stop(0)
    finally:
        receivers.stop()
