"""How a request names an adapter: plain names inside the service's --adapters directory, and
the hash a model is listed by.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from lcflow.adapter.config import CONFIG_NAME
from lcflow.core.kv import ModelIdentity
from lcflow.serving.server import ServiceError, invalid

ADAPTER_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_ADAPTER_NAME = 128


def is_plain_name(name: str) -> bool:
    return 0 < len(name) <= MAX_ADAPTER_NAME and set(name) <= ADAPTER_NAME_CHARS and not name.startswith(".")


def check_plain_name(name: str) -> None:
    """INVALID_ARGUMENT unless `name` is one plain name: no separators, no `..`, not absolute."""
    if not is_plain_name(name):
        raise invalid(
            f"adapter name {name[:MAX_ADAPTER_NAME]!r} is not a plain name: use 1-{MAX_ADAPTER_NAME} "
            "letters, digits, '.', '_' or '-', not starting with '.' (no paths)"
        )


def resolve_adapter_name(root: str | Path, name: str) -> Path:
    """The directory of the adapter a request names: one plain name inside `root`, nothing else.

    A name from the network must never reach a path outside the directory the operator chose:
    not by `..`, an absolute path, a separator, nor a symlink inside `root` pointing out of it
    (both sides are resolved before they are compared). INVALID_ARGUMENT for such a name,
    NOT_FOUND for a good name with no adapter behind it."""
    check_plain_name(name)
    base = Path(root).resolve()
    try:
        candidate = (base / name).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise invalid(f"adapter {name!r} cannot be resolved ({err}); refused") from None
    if candidate == base or not candidate.is_relative_to(base):
        raise invalid(f"adapter {name!r} resolves outside the adapter directory; refused")
    if not (candidate / CONFIG_NAME).is_file():
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no adapter {name!r} in the adapter directory")
    return candidate


def default_adapter_path(adapter: str, adapters: str) -> str:
    """A service's --adapter as a directory: a name inside --adapters when there is one by that
    name, else the path it is (as before --adapters existed); "" for none."""
    if adapter and adapters and is_plain_name(adapter) and (Path(adapters) / adapter).is_dir():
        return str(resolve_adapter_name(adapters, adapter))
    return adapter


def identity_hash(identity: ModelIdentity) -> str:
    """A model's hashes as the wire writes them (LatentHeader.sharer_id after the "@")."""
    return f"{identity.config_hash[:16]}.{identity.tokenizer_hash[:16]}"
