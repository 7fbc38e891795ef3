"""Two test "hosts" on one machine: network namespaces joined by a veth pair (needs root and iproute2).

    with two_hosts("lcft") as (sharer_host, receiver_host):
        sharer_host.popen(["python", ...])   # runs inside the sharer's namespace

Each host has its loopback up and one veth end with a private address (10.213.7.1/24 and
10.213.7.2/24 by default); the two ends reach each other and nothing else, so no packet
leaves the machine. The namespaces, and with them the veth pair, are deleted on exit, also
when the body fails; processes still running inside them are killed first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

IP_TIMEOUT_S = 10


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)


def _ip_ok(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def why_netns_unavailable() -> str | None:
    """None when network namespaces can be created here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"lcft-probe-{os.getpid()}"
    done = _ip("netns", "add", probe)
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Host:
    """One network namespace with an address on the shared veth link."""

    namespace: str
    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    link: str = ""  # this host's end of the veth pair

    def ip(self, *args: str) -> None:
        """`ip ARGS` inside this host's namespace (e.g. "link", "set", host.link, "down")."""
        _ip_ok("-n", self.namespace, *args)

    def tc(self, *args: str) -> subprocess.CompletedProcess:
        """`tc ARGS` inside this host's namespace; the result, so a caller can skip where tc is refused."""
        return subprocess.run(
            ["tc", "-n", self.namespace, *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S
        )

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host's namespace (`ip netns exec` execs it: same pid, same signals)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(self.command(argv), **kwargs)
        self.processes.append(process)
        return process

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process started here, then SIGKILL those still running after timeout_s."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)


@contextmanager
def two_hosts(
    prefix: str, addresses: tuple[str, str] = ("10.213.7.1", "10.213.7.2"), prefix_len: int = 24
) -> Iterator[tuple[Host, Host]]:
    """Two namespaces, unique to this process, joined by a veth pair; removed on exit."""
    tag = f"{prefix}{os.getpid()}"
    hosts = (Host(f"{tag}-a", addresses[0]), Host(f"{tag}-b", addresses[1]))
    links = (f"{tag}a"[:15], f"{tag}b"[:15])  # interface names are at most 15 characters
    created: list[Host] = []
    try:
        for host in hosts:
            _ip_ok("netns", "add", host.namespace)
            created.append(host)
        # Both ends are created directly inside their namespaces: nothing is left in the root one.
        _ip_ok(
            "link", "add", links[0], "netns", hosts[0].namespace,
            "type", "veth", "peer", "name", links[1], "netns", hosts[1].namespace,
        )  # fmt: skip
        for host, link in zip(hosts, links, strict=True):
            host.link = link
            ns = ("-n", host.namespace)
            _ip_ok(*ns, "link", "set", "lo", "up")
            _ip_ok(*ns, "addr", "add", f"{host.address}/{prefix_len}", "dev", link)
            _ip_ok(*ns, "link", "set", link, "up")
        yield hosts
    finally:
        for host in created:
            host.stop_all()
        for host in created:
            _ip("netns", "del", host.namespace)  # deletes its veth end, and so the pair
