"""The services' configuration: one typed object, read once from flags and environment.

Every setting has a flag and an environment variable (LCFLOW_<NAME>); a flag wins over the
environment, the environment over the default. `lcflow serve sharer --help` lists them all.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass, fields

from lcflow.core.names import CODEC_SETTINGS, QUANTIZE_SETTINGS, canonical_wire_name, split_group
from lcflow.serving.security import ClientSecurity, ServerSecurity

ROLES = ("sharer", "receiver")
DEFAULT_PORTS = {"sharer": 50051, "receiver": 50052}


@dataclass
class ServiceConfig:
    role: str
    model: str = ""
    adapter: str = ""  # the default adapter: a name inside `adapters`, or an adapter directory
    adapters: str = (
        ""  # directory of adapters a request may name (HandoffRequest.adapter), one per subdirectory
    )
    adapter_memory_mb: float = 512.0  # bound over loaded adapter halves; least recently used evicted first
    preload: bool = False  # load every usable adapter at start (within the bound), not on first use
    # sharer only: the receivers, as HOST:PORT, HOST:PORT,HOST:PORT,... or dns:///NAME:PORT (parse_receivers)
    receiver: str = ""
    host: str = "127.0.0.1"
    port: int = 0  # 0 = the role's default port
    device: str = "auto"
    dtype: str = "float32"
    max_concurrent: int = 4
    max_queue: int = -1  # handoffs waiting for a slot; -1 = 2 per --max-concurrent slot
    reflection: bool = False
    max_context_tokens: int = 4096
    max_prompt_chars: int = 32_768
    session_ttl_s: float = 600.0
    session_memory_mb: int = 1024
    shutdown_grace_s: float = 30.0
    zstd_level: int = 1  # measured: higher levels gain nothing on float latents and are slower
    # sharer only: "card" (each adapter's model card names its codec, measured: see
    # docs/results/codecs; "none" for an adapter whose card names none), or "none", "int8" or
    # "int4" for every adapter (lcflow.transport.quantize)
    quantize: str = "card"
    # sharer only: zstd over the segments, or "auto": zstd and (with quantize "card") the
    # quantization only where they save time on the link (lcflow.transport.link), judged by
    # --link-mbit or else by what recent handoffs cost
    codec: str = "auto"
    link_mbit: float = 0.0  # sharer only: the link's rate to the receivers; 0 = measure it
    log_level: str = "INFO"
    log_content: bool = False  # prompts, contexts and answers stay out of the logs unless asked
    # This server's own TLS and token (lcflow.serving.security.ServerSecurity).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token_file: str = ""
    allow_unauthenticated: bool = False  # receiver only: TLS on, yet no client certificate or token
    keepalive_s: float = 10.0  # HTTP/2 pings on busy connections: a dead peer or link found in ~1.5x this
    health_port: int = 0  # also serve grpc.health.v1 alone, in plaintext, here (probes without TLS)
    # Sharer only: how it connects to the receiver (lcflow.serving.security.ClientSecurity).
    receiver_tls_ca: str = ""
    receiver_tls_client_cert: str = ""
    receiver_tls_client_key: str = ""
    receiver_auth_token_file: str = ""
    receiver_tls_server_name: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        if not self.port:
            self.port = DEFAULT_PORTS[self.role]
        if self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be at least 1, not {self.max_concurrent}")
        if self.max_queue < 0:
            self.max_queue = 2 * self.max_concurrent
        if split_group(self.quantize)[0] not in QUANTIZE_SETTINGS:
            raise ValueError(
                f"--quantize must be one of {', '.join(QUANTIZE_SETTINGS)} (an int4 one may name its "
                f"group size from 8 to 4096: int4-hadamard-g32), not {self.quantize!r}"
            )
        self.quantize = canonical_wire_name(self.quantize)  # "int4-g64" is "int4"
        if self.codec not in CODEC_SETTINGS:
            raise ValueError(f"--codec must be one of {', '.join(CODEC_SETTINGS)}, not {self.codec!r}")
        if self.link_mbit < 0:
            raise ValueError(f"--link-mbit must be 0 (measure) or a positive rate, not {self.link_mbit}")
        if self.adapter_memory_mb <= 0:
            raise ValueError(f"--adapter-memory-mb must be positive, not {self.adapter_memory_mb}")
        security = self.server_security()  # raises on a half-given TLS setting
        if (
            self.role == "receiver"
            and security.tls
            and not security.authenticates_clients
            and not self.allow_unauthenticated
        ):
            # A receiver is a free LLM endpoint to whoever reaches it; once it is worth encrypting
            # the hop, it is worth knowing who is on the other end.
            raise ValueError(
                "TLS is on but nothing authenticates the sharer: give --tls-client-ca (mutual TLS) "
                "or --auth-token-file, or pass --allow-unauthenticated to accept any client"
            )
        if self.role == "sharer":
            receiver_security = self.receiver_security()  # the same checks for the client side
            receivers = self.receivers() if self.receiver else None
            if (
                receivers is not None
                and receiver_security.tls
                and len(receivers.addresses) > 1
                and not receivers.authority
                and not self.receiver_tls_server_name
            ):
                # One channel checks every receiver's certificate against one name.
                raise ValueError(
                    "TLS to receivers on different hosts needs --receiver-tls-server-name: a name "
                    "every receiver's certificate carries (lcflow certs make --hosts NAME,...)"
                )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def receivers(self) -> ReceiverTarget:
        """Sharer: the gRPC target for --receiver (one receiver, a list, or a DNS name)."""
        return parse_receivers(self.receiver)

    def server_security(self):

        return ServerSecurity(self.tls_cert, self.tls_key, self.tls_client_ca, self.auth_token_file)

    def receiver_security(self):
        """Sharer: TLS / token settings of its channel to the receiver (files are read when it is made)."""

        return ClientSecurity(
            self.receiver_tls_ca,
            self.receiver_tls_client_cert,
            self.receiver_tls_client_key,
            self.receiver_auth_token_file,
            self.receiver_tls_server_name,
        )


# --- the receivers behind one sharer -------------------------------------------------------------

# Targets gRPC resolves itself, passed through as they are: dns:///NAME:PORT (every address of
# the name, re-resolved when connections fail: a Kubernetes headless Service), ipv4:/ipv6: lists.
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
_ENTRY = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\],]+)):(?P<port>\d+)$")


@dataclass(frozen=True)
class ReceiverTarget:
    """What the sharer's channel dials for --receiver. The channel balances handoffs round-robin
    over every address and skips a receiver whose grpc.health.v1 status is not SERVING (or that
    cannot be reached), trying it again later (lcflow/serving/sharer.py)."""

    target: str  # the gRPC target
    addresses: tuple[str, ...]  # the receivers as given (one entry for HOST:PORT or a dns:/// name)
    authority: str = ""  # :authority and TLS name for a list on one host ("" = gRPC's own)


def parse_receivers(text: str) -> ReceiverTarget:
    """--receiver / LCFLOW_RECEIVER as a gRPC target:

    - `HOST:PORT`: as before (gRPC's DNS resolver; a name with several addresses is balanced over);
    - `dns:///NAME:PORT` (or any target with a gRPC scheme): passed through;
    - `A:PORT,B:PORT,...`: IP addresses (or `localhost`) become one `ipv4:` / `ipv6:` target.
      Other host names are refused: gRPC balances over a fixed list of addresses only, and names
      resolved once here would go stale when a receiver moves; a DNS name that holds every
      receiver's address (`dns:///NAME:PORT`) is re-resolved by gRPC itself.

    Raises ValueError with what to give instead."""
    text = text.strip()
    if text.startswith(GRPC_SCHEMES):
        return ReceiverTarget(text, (text,))
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if len(entries) <= 1:
        return ReceiverTarget(entries[0] if entries else "", tuple(entries))
    hosts, dialled, families = [], [], set()
    for entry in entries:
        match = _ENTRY.match(entry)
        if match is None:
            raise ValueError(f"--receiver entry {entry!r} is not HOST:PORT (IPv6: [ADDRESS]:PORT)")
        host, port = match["v6"] or match["host"], int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f"--receiver entry {entry!r}: port {port} is out of range")
        try:
            address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            raise ValueError(
                f"--receiver lists the host name {host!r}: a list takes IP addresses (or localhost); "
                "for receivers found by name give one DNS name that resolves to all of them, "
                "dns:///NAME:PORT (a Kubernetes headless Service, a scaled compose service)"
            ) from None
        families.add(address.version)
        hosts.append(f"[{host}]" if address.version == 6 else host)
        dialled.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
    if len(families) > 1:
        raise ValueError("--receiver mixes IPv4 and IPv6 addresses; gRPC takes one family per list")
    if len(set(dialled)) < len(dialled):
        raise ValueError(f"--receiver lists the same receiver twice: {text}")
    family = families.pop()
    authority = hosts[0] if len(set(hosts)) == 1 else ""
    return ReceiverTarget(f"ipv{family}:" + ",".join(dialled), tuple(entries), authority)


HELP = {
    "model": "model to serve: a name from `lcflow models list`, a local directory or a hub id",
    "adapter": "default adapter (LCF, LCF-X or C2C): a name inside --adapters, or an adapter directory; the "
    "sharer loads its encoder half, the receiver its decoder half, at start",
    "adapters": "directory of adapters, one per subdirectory (as adapters/ is laid out), that requests pick "
    "by name (HandoffRequest.adapter) or by mode; names resolve only inside it (no paths, no symlinks "
    "out); give both services the same adapters",
    "adapter_memory_mb": "memory bound over the adapters loaded from --adapters (the default's included); "
    "least recently used are evicted first, never one a running handoff uses",
    "preload": "load every usable adapter in --adapters at start (as far as --adapter-memory-mb allows) "
    "instead of on first use",
    "receiver": "sharer only: the receiver, HOST:PORT, or several: a list of IP:PORT (comma-separated) or "
    "dns:///NAME:PORT (every address of NAME, re-resolved); handoffs go round-robin to the receivers "
    "whose health is SERVING, a dead one is skipped and tried again later",
    "host": "address to listen on (0.0.0.0 to accept connections from other hosts)",
    "port": "port to listen on (default 50051 for the sharer, 50052 for the receiver)",
    "device": "auto (CUDA when present), cpu or cuda",
    "dtype": "model dtype: float32, bfloat16 or float16",
    "max_concurrent": "handoffs served at once; more wait in the queue (--max-queue)",
    "max_queue": "handoffs that may wait for a slot, each until its own deadline; more get "
    "RESOURCE_EXHAUSTED with a retry hint. -1: 2 per --max-concurrent slot; 0: no queue",
    "reflection": "enable gRPC server reflection (for grpcurl and similar tools)",
    "max_context_tokens": "longest context or prompt accepted, in tokens; longer ones get INVALID_ARGUMENT",
    "max_prompt_chars": "longest text field accepted, in characters",
    "session_ttl_s": "sharer sessions expire after this many idle seconds",
    "session_memory_mb": "memory bound over all sharer sessions; least recently used are evicted first",
    "shutdown_grace_s": "on SIGTERM, seconds to let in-flight handoffs finish",
    "zstd_level": "sharer only: zstd level of the latent stream",
    "quantize": "sharer only: latents on the wire as card (each adapter's model card names the smallest "
    "codec measured within 1 EM point of bf16 for it, bf16 where it names none; with --codec auto, bf16 and "
    "the other codecs it measured within the point may go instead where they cost less time), none (bf16), int8 (one "
    "scale per row; an LCF packet ~2x smaller), int4 (one scale per 64 elements; ~4.2x smaller) or "
    "int4-hadamard (int4 with each group rotated first: as small, less error where a few channels are "
    "large); an int4 one may name its group size (int4-hadamard-g32: for packet rows 64 does not divide); "
    "int8 and int4 need receivers that read latent format version 2, int4-hadamard version 3",
    "codec": "sharer only: zstd over each latent segment (zstd), never (none), or auto: zstd, and with "
    "--quantize card the quantization among those the model card allows, only where they save time on "
    "the link: judged from --link-mbit by a rule (the smallest quantization, zstd where it pays), or else "
    "by which cost least on recent handoffs (each is tried); the summary and the trace say which ran and why",
    "link_mbit": "sharer only: the link's rate to the receivers in Mbit/s, for --codec auto; 0 = judge by "
    "what recent handoffs cost with each codec",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_content": "let prompts, contexts and answers appear in the logs (off: only their sizes do)",
    "tls_cert": "serve TLS with this certificate (PEM; `lcflow certs make`); re-read on change or SIGHUP",
    "tls_key": "private key (PEM) of --tls-cert",
    "tls_client_ca": "mutual TLS: require every client to present a certificate signed by this CA (PEM)",
    "auth_token_file": "require 'authorization: Bearer <token>' on every RPC but health; the file holds "
    "the token and is re-read when it changes",
    "keepalive_s": "HTTP/2 keepalive ping interval on connections with calls in flight: a peer that died or "
    "a link that was cut is noticed within ~1.5x this, not only at the deadline",
    "health_port": "also answer grpc.health.v1 (and nothing else) in plaintext on this port, for probes "
    "that cannot speak TLS such as Kubernetes' grpc probes; 0 = off",
    "allow_unauthenticated": "receiver only: accept TLS clients with neither a client certificate nor a token",
    "receiver_tls_ca": "sharer only: CA (PEM) of the receiver's certificate; turns TLS on towards the receiver",
    "receiver_tls_client_cert": "sharer only: client certificate (PEM) to present to the receiver (mutual TLS)",
    "receiver_tls_client_key": "sharer only: private key (PEM) of --receiver-tls-client-cert",
    "receiver_auth_token_file": "sharer only: file holding the bearer token the receiver requires",
    "receiver_tls_server_name": "sharer only: name the receiver's certificate carries, if not the --receiver "
    "host (needed for a list of receivers on different hosts: one name all their certificates carry)",
}

# Other spellings of a flag, still accepted (the directory flag was --adapter-dir before --adapters).
ALIASES = {"adapters": ("--adapter-dir",)}

SHARER_ONLY = {"receiver", "zstd_level", "quantize", "codec", "link_mbit"} | {
    name for name in HELP if name.startswith("receiver_")
}
RECEIVER_ONLY = {"allow_unauthenticated"}


def env_name(field_name: str) -> str:
    return "LCFLOW_" + field_name.upper()


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_service_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """One flag per ServiceConfig field, its default read from LCFLOW_<NAME> when set."""
    defaults = ServiceConfig(role=role)
    for f in fields(ServiceConfig):
        if f.name == "role" or (f.name in SHARER_ONLY and role != "sharer"):
            continue
        if f.name in RECEIVER_ONLY and role != "receiver":
            continue
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(str(f.type), str)
        env = env_name(f.name)
        # the field's own default where __post_init__ derives the value (max_queue -1: from the slots)
        default = f.default if f.name == "max_queue" else getattr(defaults, f.name)
        if env in os.environ:
            default = kind(os.environ[env])
        flag = "--" + f.name.replace("_", "-")
        extra = {"nargs": "?", "const": True} if kind is _parse_bool else {}
        parser.add_argument(
            flag,
            *ALIASES.get(f.name, ()),
            type=kind,
            default=default,
            help=f"{HELP[f.name]} [env {env}]",
            **extra,
        )


def config_from_args(role: str, args: argparse.Namespace) -> ServiceConfig:
    names = {f.name for f in fields(ServiceConfig)} - {"role"}
    try:
        config = ServiceConfig(role=role, **{k: v for k, v in vars(args).items() if k in names})
    except ValueError as err:  # a setting that cannot work: one line, before anything starts
        raise SystemExit(f"{role}: {err}") from None
    if not config.model:
        raise SystemExit(f"{role}: no model given; pass --model or set {env_name('model')}")
    if role == "sharer" and not config.receiver:
        raise SystemExit(
            f"sharer: no receiver given; pass --receiver HOST:PORT or set {env_name('receiver')}"
        )
    return config
