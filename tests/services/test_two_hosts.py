"""Sharer and receiver on two separate "hosts": network namespaces joined by a veth pair.

The deployment the compose file describes, minus Docker: each service is started with
`lcflow serve ROLE` configured only by the environment variables compose gives it
(LCFLOW_MODEL, LCFLOW_ADAPTER, LCFLOW_HOST=0.0.0.0, LCFLOW_PORT, LCFLOW_RECEIVER,
OTEL_TRACES_EXPORTER, OTEL_SERVICE_NAME), the sharer in namespace A (10.213.7.1) and the
receiver in namespace B (10.213.7.2). The client runs `lcflow handoff` on host A. Checked:
the LCF-X handoff crosses the link, one trace joins both services' spans (the receiver's
server span is a child of the sharer's client span), and the receiver cannot be reached
from the test's own (root) namespace.

Needs root and iproute2 (`ip netns add`); skipped with the reason otherwise.
Run alone with `pytest -m two_hosts`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from service_helpers import console_spans

from lcflow.adapter import LatentAdapter
from lcflow.bench.netns import Host, two_hosts, why_netns_unavailable
from lcflow.core.kv import model_identity
from lcflow.testing.tiny import load_tiny

pytestmark = pytest.mark.two_hosts

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
SHARER_ADDR, RECEIVER_ADDR = "10.213.7.1", "10.213.7.2"
SHARER_PORT, RECEIVER_PORT = 50051, 50052
STARTUP_TIMEOUT_S = 180.0
HANDOFF_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def netns_ok():
    why = why_netns_unavailable()
    if why:
        print(f"SKIP two-hosts test: {why}")
        pytest.skip(f"two-hosts test needs network namespaces: {why}")


@pytest.fixture(scope="module")
def tiny_lcfx(tiny_dir, tmp_path_factory):
    """Tiny sharer and receiver models and an LCF-X adapter between them, in tmp dirs."""
    sharer_dir, receiver_dir = tiny_dir("llama", 300, 3), tiny_dir("gemma3", 400, 2)
    s, r = load_tiny(sharer_dir), load_tiny(receiver_dir)
    adapter = LatentAdapter.for_models("lcfx", model_identity(*s), model_identity(*r), bottleneck=16, slots=4)
    torch.nn.init.normal_(next(p for n, p in adapter.named_parameters() if n.endswith("up.weight")), std=0.3)
    return sharer_dir, receiver_dir, adapter.save_pretrained(tmp_path_factory.mktemp("two-hosts-adapter"))


def service_env(**settings: str) -> dict[str, str]:
    """The test's environment without proxy, LCFLOW_* or OTEL_* settings, plus the given ones."""
    dropped = ("LCFLOW_", "OTEL_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(dropped) and "proxy" not in k.lower()  # gRPC would honour a proxy
    }
    env.update(
        PYTHONUNBUFFERED="1",  # spans reach the log file even if a service has to be killed
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    env.update(settings)
    return env


def start_service(host: Host, role: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "lcflow.cli", "serve", role]
    with open(log_dir / f"{role}.out", "w") as out, open(log_dir / f"{role}.err", "w") as err:
        return host.popen(command, stdout=out, stderr=err, env=env)


def wait_healthy(host: Host, port: int, service: str, process: subprocess.Popen, log_dir: Path) -> None:
    """Poll docker/healthcheck.py from inside the host's namespace until SERVING (bounded)."""
    probe = [sys.executable, str(HEALTHCHECK), "--host", host.address, "--port", str(port)]
    probe += ["--service", service, "--timeout", "2"]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            role = service.rsplit(".", 1)[-1].lower()
            pytest.fail(
                f"{service} exited with code {process.returncode} before it was healthy:\n"
                + (log_dir / f"{role}.err").read_text()[-3000:]
            )
        done = host.run(probe, timeout=20, capture_output=True, text=True, env=service_env())
        if done.returncode == 0:
            return
        last = (done.stdout + done.stderr).strip()
        time.sleep(1.0)
    pytest.fail(f"{service} on {host.namespace} was not SERVING after {STARTUP_TIMEOUT_S:.0f} s: {last}")


def tcp_connects(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((address, port)) == 0


def read_spans(path: Path) -> list[dict]:
    """The span JSON objects the console exporter wrote (one per line)."""
    return [s for s in console_spans(path.read_text()) if "context" in s and "resource" in s]


def hex_id(value: str) -> str:
    return value.removeprefix("0x").lower()


def test_handoff_between_two_hosts_is_one_trace_across_the_link(netns_ok, tiny_lcfx, tmp_path):
    sharer_dir, receiver_dir, adapter_dir = tiny_lcfx
    common = {"LCFLOW_ADAPTER": str(adapter_dir), "LCFLOW_HOST": "0.0.0.0", "LCFLOW_DEVICE": "cpu"}
    common |= {"LCFLOW_DTYPE": "float32", "LCFLOW_MAX_CONCURRENT": "2", "LCFLOW_SHUTDOWN_GRACE_S": "5"}
    common |= {"OTEL_TRACES_EXPORTER": "console"}
    receiver_env = service_env(
        **common,
        OTEL_SERVICE_NAME="lcflow-receiver",
        LCFLOW_MODEL=str(receiver_dir),
        LCFLOW_PORT=str(RECEIVER_PORT),
    )
    sharer_env = service_env(
        **common,
        OTEL_SERVICE_NAME="lcflow-sharer",
        LCFLOW_MODEL=str(sharer_dir),
        LCFLOW_PORT=str(SHARER_PORT),
        LCFLOW_RECEIVER=f"{RECEIVER_ADDR}:{RECEIVER_PORT}",
    )
    root_port_was_free = not tcp_connects("127.0.0.1", RECEIVER_PORT)

    with two_hosts("lcft", (SHARER_ADDR, RECEIVER_ADDR)) as (sharer_host, receiver_host):
        receiver = start_service(receiver_host, "receiver", receiver_env, tmp_path)
        sharer = start_service(sharer_host, "sharer", sharer_env, tmp_path)
        wait_healthy(receiver_host, RECEIVER_PORT, "lcflow.v1.Receiver", receiver, tmp_path)
        wait_healthy(sharer_host, SHARER_PORT, "lcflow.v1.Sharer", sharer, tmp_path)

        # Isolation: the receiver listens on 0.0.0.0 of its own namespace only.
        assert os.readlink(f"/proc/{receiver.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        if root_port_was_free:
            assert not tcp_connects("127.0.0.1", RECEIVER_PORT), "receiver reachable from the root namespace"
        else:
            print(f"note: 127.0.0.1:{RECEIVER_PORT} was already in use in the root namespace before the test")

        # The client runs on the sharer's host and talks to the sharer over its link address.
        handoff = [sys.executable, "-m", "lcflow.cli", "handoff", "--sharer", f"{SHARER_ADDR}:{SHARER_PORT}"]
        handoff += ["--context", "Mira lives in Oslo and works as a baker."]
        handoff += ["--prompt", "Where does Mira live?", "--mode", "lcfx", "--max-new-tokens", "4"]
        handoff += ["--timeout", str(HANDOFF_TIMEOUT_S)]
        done = sharer_host.run(
            handoff,
            timeout=HANDOFF_TIMEOUT_S + 30,
            capture_output=True,
            text=True,
            env=service_env(OTEL_TRACES_EXPORTER="none"),
        )
        sharer_host.stop_all()
        receiver_host.stop_all()

    assert done.returncode == 0, done.stdout + done.stderr
    assert "mode LCF_X" in done.stdout, done.stdout
    assert re.search(r"time_to_first_token\s+[\d.]+ ms", done.stdout), done.stdout  # an answer token came
    match = re.search(r"^\s*trace ([0-9a-f]{32})$", done.stdout, flags=re.MULTILINE)
    assert match, f"no trace id in the summary:\n{done.stdout}"
    trace_id = match.group(1)
    assert sharer.returncode == 0 and receiver.returncode == 0, "a service did not stop cleanly on SIGTERM"

    spans = {role: read_spans(tmp_path / f"{role}.out") for role in ("sharer", "receiver")}
    in_trace = {
        role: [s for s in found if hex_id(s["context"]["trace_id"]) == trace_id]
        for role, found in spans.items()
    }
    for role in ("sharer", "receiver"):
        assert in_trace[role], f"no {role} span in trace {trace_id}; {len(spans[role])} spans in all"
        names = {s["resource"]["attributes"]["service.name"] for s in in_trace[role]}
        assert names == {f"lcflow-{role}"}

    def rpc_span(role: str, kind: str, name_prefix: str) -> dict:
        found = [
            s for s in in_trace[role] if s["kind"] == f"SpanKind.{kind}" and s["name"].startswith(name_prefix)
        ]
        assert len(found) == 1, [(s["name"], s["kind"]) for s in in_trace[role]]
        return found[0]

    # client -> sharer (Handoff) -> sharer's call to the receiver -> receiver (Receive)
    sharer_server = rpc_span("sharer", "SERVER", "/lcflow.v1.Sharer/Handoff")
    sharer_client = rpc_span("sharer", "CLIENT", "/lcflow.v1.Receiver/")
    receiver_server = rpc_span("receiver", "SERVER", "/lcflow.v1.Receiver/")
    assert receiver_server["name"] == sharer_client["name"]
    assert hex_id(receiver_server["parent_id"]) == hex_id(sharer_client["context"]["span_id"])
    assert hex_id(sharer_client["parent_id"]) == hex_id(sharer_server["context"]["span_id"])
    assert sharer_server["parent_id"], "the handoff client's trace context did not reach the sharer"
    # The calls really crossed the veth link: each server saw its caller's host address.
    assert sharer_server["attributes"]["net.peer.ip"] == SHARER_ADDR  # the client runs on the sharer's host
    assert receiver_server["attributes"]["net.peer.ip"] == SHARER_ADDR


def test_handoff_between_two_hosts_runs_over_mutual_tls_with_tokens(netns_ok, tiny_lcfx, tmp_path):
    """The same two hosts, every hop over mutual TLS with a bearer token, configured only by
    LCFLOW_* variables and `lcflow handoff` flags; probes use the plaintext health port."""
    from lcflow.commands.certs import make_certs, make_token

    sharer_dir, receiver_dir, adapter_dir = tiny_lcfx
    certs = tmp_path / "certs"
    make_certs(certs, [SHARER_ADDR, RECEIVER_ADDR])
    token = str(make_token(certs))
    health_port = 50060
    tls = {
        "LCFLOW_TLS_CERT": str(certs / "server.pem"),
        "LCFLOW_TLS_KEY": str(certs / "server-key.pem"),
        "LCFLOW_TLS_CLIENT_CA": str(certs / "ca.pem"),
        "LCFLOW_AUTH_TOKEN_FILE": token,
        "LCFLOW_HEALTH_PORT": str(health_port),
    }
    common = {"LCFLOW_ADAPTER": str(adapter_dir), "LCFLOW_HOST": "0.0.0.0", "LCFLOW_DEVICE": "cpu"}
    common |= {"LCFLOW_MAX_CONCURRENT": "2", "LCFLOW_SHUTDOWN_GRACE_S": "5", "OTEL_TRACES_EXPORTER": "none"}
    receiver_env = service_env(
        **common, **tls, LCFLOW_MODEL=str(receiver_dir), LCFLOW_PORT=str(RECEIVER_PORT)
    )
    sharer_env = service_env(
        **common,
        **tls,
        LCFLOW_MODEL=str(sharer_dir),
        LCFLOW_PORT=str(SHARER_PORT),
        LCFLOW_RECEIVER=f"{RECEIVER_ADDR}:{RECEIVER_PORT}",
        LCFLOW_RECEIVER_TLS_CA=str(certs / "ca.pem"),
        LCFLOW_RECEIVER_TLS_CLIENT_CERT=str(certs / "client.pem"),
        LCFLOW_RECEIVER_TLS_CLIENT_KEY=str(certs / "client-key.pem"),
        LCFLOW_RECEIVER_AUTH_TOKEN_FILE=token,
    )
    handoff = [sys.executable, "-m", "lcflow.cli", "handoff", "--sharer", f"{SHARER_ADDR}:{SHARER_PORT}"]
    handoff += ["--context", "Mira lives in Oslo.", "--prompt", "Where does Mira live?", "--mode", "lcfx"]
    handoff += ["--max-new-tokens", "3", "--timeout", str(HANDOFF_TIMEOUT_S)]
    secured = ["--tls-ca", str(certs / "ca.pem"), "--tls-client-cert", str(certs / "client.pem")]
    secured += ["--tls-client-key", str(certs / "client-key.pem"), "--auth-token-file", token]

    with two_hosts("lcfm", (SHARER_ADDR, RECEIVER_ADDR)) as (sharer_host, receiver_host):
        receiver = start_service(receiver_host, "receiver", receiver_env, tmp_path)
        sharer = start_service(sharer_host, "sharer", sharer_env, tmp_path)
        wait_healthy(receiver_host, health_port, "lcflow.v1.Receiver", receiver, tmp_path)
        wait_healthy(sharer_host, health_port, "lcflow.v1.Sharer", sharer, tmp_path)

        def run(argv):
            return sharer_host.run(
                argv, timeout=HANDOFF_TIMEOUT_S + 30, capture_output=True, text=True, env=service_env()
            )

        done = run(handoff + secured)
        plaintext = run(handoff)
        no_token = run(handoff + secured[:6])
        sharer_host.stop_all()
        receiver_host.stop_all()

    assert done.returncode == 0, done.stdout + done.stderr
    assert "mode LCF_X" in done.stdout and re.search(r"time_to_first_token\s+[\d.]+ ms", done.stdout)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr
    assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr, no_token.stderr
    assert sharer.returncode == 0 and receiver.returncode == 0, "a service did not stop cleanly on SIGTERM"
