"""The services' configuration: one typed object, read once from flags and environment.

Every setting has a flag and an environment variable (LCFLOW_<NAME>); a flag wins over the
environment, the environment over the default. `lcflow serve sharer --help` lists them all.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

ROLES = ("sharer", "receiver")
DEFAULT_PORTS = {"sharer": 50051, "receiver": 50052}


@dataclass
class ServiceConfig:
    role: str
    model: str = ""
    adapter: str = ""
    receiver: str = ""  # sharer only: the receiver's gRPC target (host:port or dns:///name:port)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = the role's default port
    device: str = "auto"
    dtype: str = "float32"
    max_concurrent: int = 4
    reflection: bool = False
    max_context_tokens: int = 4096
    max_prompt_chars: int = 32_768
    session_ttl_s: float = 600.0
    session_memory_mb: int = 1024
    shutdown_grace_s: float = 30.0
    zstd_level: int = 1  # measured: higher levels gain nothing on float latents and are slower
    log_level: str = "INFO"

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        if not self.port:
            self.port = DEFAULT_PORTS[self.role]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


HELP = {
    "model": "model to serve: a name from `lcflow models list`, a local directory or a hub id",
    "adapter": "adapter directory (LCF or LCF-X); the sharer loads its encoder half, the receiver its decoder half",
    "receiver": "sharer only: the receiver's gRPC target, host:port or dns:///name:port (round-robin over all addresses)",
    "host": "address to listen on (0.0.0.0 to accept connections from other hosts)",
    "port": "port to listen on (default 50051 for the sharer, 50052 for the receiver)",
    "device": "auto (CUDA when present), cpu or cuda",
    "dtype": "model dtype: float32, bfloat16 or float16",
    "max_concurrent": "handoffs served at once; more get RESOURCE_EXHAUSTED",
    "reflection": "enable gRPC server reflection (for grpcurl and similar tools)",
    "max_context_tokens": "longest context or prompt accepted, in tokens; longer ones get INVALID_ARGUMENT",
    "max_prompt_chars": "longest text field accepted, in characters",
    "session_ttl_s": "sharer sessions expire after this many idle seconds",
    "session_memory_mb": "memory bound over all sharer sessions; least recently used are evicted first",
    "shutdown_grace_s": "on SIGTERM, seconds to let in-flight handoffs finish",
    "zstd_level": "sharer only: zstd level of the latent stream",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


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
        if f.name == "role" or (f.name in ("receiver", "zstd_level") and role != "sharer"):
            continue
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(str(f.type), str)
        env = env_name(f.name)
        default = getattr(defaults, f.name)
        if env in os.environ:
            default = kind(os.environ[env])
        flag = "--" + f.name.replace("_", "-")
        extra = {"nargs": "?", "const": True} if kind is _parse_bool else {}
        parser.add_argument(flag, type=kind, default=default, help=f"{HELP[f.name]} [env {env}]", **extra)


def config_from_args(role: str, args: argparse.Namespace) -> ServiceConfig:
    names = {f.name for f in fields(ServiceConfig)} - {"role"}
    config = ServiceConfig(role=role, **{k: v for k, v in vars(args).items() if k in names})
    if not config.model:
        raise SystemExit(f"{role}: no model given; pass --model or set {env_name('model')}")
    if role == "sharer" and not config.receiver:
        raise SystemExit(
            f"sharer: no receiver given; pass --receiver HOST:PORT or set {env_name('receiver')}"
        )
    return config
