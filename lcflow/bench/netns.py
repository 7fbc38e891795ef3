"""Network namespaces for tests and benchmarks (needs root and iproute2).

Two "hosts" on one machine, namespaces joined by a veth pair:

    with two_hosts("lcft") as (sharer_host, receiver_host):
        sharer_host.popen(["python", ...])   # runs inside the sharer's namespace

A link of a given rate from this process to one namespace (`lcflow bench transport --link`):

    with rate_limited_link("lcfb", "100mbit") as link:
        ...   # a server in link.namespace (enter_namespace) listens on link.remote

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


# --- a rate-limited link to one namespace (lcflow bench transport --link) ---------------------------

CLONE_NEWNET = 0x40000000  # setns(2): the network namespace
RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
TBF_LATENCY = "200ms"  # how long tbf queues a packet before dropping it: long, so it shapes, not drops
MIN_BURST_BYTES = 32 << 10


def rate_bits_per_s(rate: str) -> float:
    """A tc rate ("10gbit", "100mbit", "500kbit") in bits per second; ValueError for anything else."""
    for unit, scale in RATE_UNITS.items():
        number = rate.lower().removesuffix(unit)
        if number != rate.lower():
            try:
                value = float(number)
            except ValueError:
                break
            if value > 0:
                return value * scale
    raise ValueError(f"link rate {rate!r} is not a tc rate: use e.g. 10gbit, 1gbit, 100mbit or 500kbit")


def tbf_burst_bytes(bits_per_s: float) -> int:
    """tbf's bucket: at least what the rate delivers in one 4 ms kernel tick (tc refuses less), and
    small against the payloads measured (MBs), so the rate, not the bucket, sets their time."""
    return max(MIN_BURST_BYTES, int(bits_per_s / 8 / 250))


def enter_namespace(name: str) -> None:
    """Move the calling thread into network namespace `name` (`ip netns add`). Call it first thing
    in a fresh process, before any thread starts: threads made later inherit it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"cannot enter network namespace {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class RateLimitedLink:
    """A veth pair from this namespace (`local`) to `namespace` (`remote`), both directions shaped
    to `rate` by a token bucket (tc tbf). No delay is added: netem is often missing (it is on the
    development machine), so a round trip is what the veth pair itself takes, measured by callers."""

    namespace: str
    local: str
    remote: str
    rate: str
    bits_per_s: float


def why_rate_limit_unavailable() -> str | None:
    """None when a rate-limited link can be made here, else the reason (no root, no ip/tc, no tbf)."""
    why = why_netns_unavailable()
    if why is not None:
        return why
    if shutil.which("tc") is None:
        return "the `tc` command (iproute2) is not installed"
    try:
        with rate_limited_link("lcfp", "100mbit"):
            return None
    except RuntimeError as err:
        return f"a rate-limited veth link cannot be made here: {err}"


@contextmanager
def rate_limited_link(
    prefix: str, rate: str, addresses: tuple[str, str] = ("10.213.9.1", "10.213.9.2"), prefix_len: int = 24
) -> Iterator[RateLimitedLink]:
    """A namespace unique to this process, joined to this one by a veth pair shaped to `rate`;
    removed on exit (the pair with it)."""
    bits = rate_bits_per_s(rate)
    tag = f"{prefix}{os.getpid()}"
    namespace, here, there = tag, f"{tag}h"[:15], f"{tag}n"[:15]
    shape = ["root", "tbf", "rate", rate, "burst", str(tbf_burst_bytes(bits)), "latency", TBF_LATENCY]
    _ip_ok("netns", "add", namespace)
    try:
        _ip_ok("link", "add", here, "type", "veth", "peer", "name", there, "netns", namespace)
        _ip_ok("addr", "add", f"{addresses[0]}/{prefix_len}", "dev", here)
        _ip_ok("link", "set", here, "up")
        _ip_ok("-n", namespace, "link", "set", "lo", "up")
        _ip_ok("-n", namespace, "addr", "add", f"{addresses[1]}/{prefix_len}", "dev", there)
        _ip_ok("-n", namespace, "link", "set", there, "up")
        for tc in (
            ["tc", "qdisc", "add", "dev", here],
            ["tc", "-n", namespace, "qdisc", "add", "dev", there],
        ):
            done = subprocess.run([*tc, *shape], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(tc + shape)}` failed: {done.stderr.strip()}")
        yield RateLimitedLink(namespace, addresses[0], addresses[1], rate, bits)
    finally:
        _ip("link", "del", here)  # gone already if the namespace went first
        _ip("netns", "del", namespace)
