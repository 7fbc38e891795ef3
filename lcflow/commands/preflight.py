"""Checks of what a command was given, run before anything slow (a model load, a hub download).

A mistyped model name, a missing file or an adapter for other models is the user's to fix: each
check raises `UsageError` with one line saying what is wrong and what to do, which `lcflow`
prints without a traceback (`lcflow --debug` shows it). Each check reads only small files
(configs, a tokenizer), never weights.
"""

from __future__ import annotations

import types
from pathlib import Path

from lcflow.core.errors import UsageError
from lcflow.provision import KNOWN_MODELS, ProvisionError, resolve_model


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def check_model(name: str, flag: str = "--model") -> str:
    """What `name` resolves to (a directory, or a hub id `org/name`), or UsageError.

    A bare name that is neither a known model nor a local directory is a typo far more often than
    a hub id (the hub's ids are `org/name`): say so at once instead of retrying the hub for 20 s.
    A known name must have been pulled."""

    if not name:
        raise UsageError(f"no model given: pass {flag} NAME (see `lcflow models list`)")
    try:
        resolved = resolve_model(name)
    except ProvisionError as err:  # a known name, not pulled yet
        raise UsageError(str(err)) from err
    if Path(resolved).is_dir():
        return resolved
    if looks_like_path(name):
        raise UsageError(f"{flag} {name}: no such directory")
    if "/" not in name:
        raise UsageError(
            f"{flag} {name!r} is not a known model nor a local directory; `lcflow models list` shows "
            f"the known names ({', '.join(KNOWN_MODELS)}); a Hugging Face hub id has the form org/name"
        )
    return resolved  # a hub id: only the hub can say whether it exists


def _stand_in(model_dir: str):
    """A model's identity from its config and tokenizer alone: what `model_identity` reads, without weights."""
    from transformers import AutoConfig, AutoTokenizer

    return types.SimpleNamespace(config=AutoConfig.from_pretrained(model_dir)), AutoTokenizer.from_pretrained(
        model_dir
    )


def check_adapter(adapter_dir: str, role: str, model: str = "", model_dir: str = "") -> None:
    """A service's --adapter: a directory with a readable config of a mode the services serve, the
    half this role loads, and (when the model is a local directory) trained for this model."""
    from lcflow.adapter.config import AdapterConfig, service_half_file  # keeps --help fast

    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise UsageError(
            f"--adapter {adapter_dir}: no such directory; give an adapter directory "
            "(e.g. adapters/gemma3-to-gemma3-lcfx) or leave --adapter out to serve TEXT and NONE only"
        )
    try:
        config = AdapterConfig.load(path)
    except FileNotFoundError as err:
        raise UsageError(f"--adapter {adapter_dir} is not an adapter directory: {err}") from err
    except (ValueError, KeyError, TypeError) as err:  # bad JSON, another format version, missing fields
        raise UsageError(f"--adapter {adapter_dir}: its adapter_config.json cannot be used ({err})") from err
    filename = service_half_file(config.mode, role)
    if filename is not None and not (path / filename).is_file():
        raise UsageError(
            f"--adapter {adapter_dir} has no {filename}, the half a {role} loads; "
            "copy the whole adapter directory"
        )
    if config.mode == "c2c" and role == "receiver":
        from lcflow.serving.inspection import c2c_rope_problem  # keeps --help fast

        if why := c2c_rope_problem(config):  # the receiver re-rotates the sharer's keys with it
            raise UsageError(f"--adapter {adapter_dir}: {why}")
    if model_dir and Path(model_dir).is_dir():
        from lcflow.core.kv import model_identity  # keeps --help fast

        try:
            identity = model_identity(*_stand_in(model_dir), name=model or None)
            config.check_models(**{role: identity})
        except ValueError as err:  # AdapterMismatchError, UnsupportedModelError
            raise UsageError(f"--adapter {adapter_dir} does not fit --model {model}: {err}") from err


def check_service(config) -> None:
    """Everything `lcflow serve` can check before it listens and loads the model. Adapters in
    --adapters are not checked here: one that does not fit is listed as unusable, not fatal."""
    model_dir = check_model(config.model)
    if config.adapters:
        check_adapter_directory(config.adapters, config.adapter)
    if config.adapter:
        from lcflow.serving.adapter_names import default_adapter_path  # keeps --help fast

        try:
            default = default_adapter_path(config.adapter, config.adapters)
        except Exception as err:  # a name whose symlink leads out of --adapters
            raise UsageError(f"--adapter {config.adapter}: {getattr(err, 'details', err)}") from err
        check_adapter(default, config.role, config.model, model_dir)


def check_adapter_directory(adapters: str, adapter: str) -> None:
    """--adapters is a directory; --adapter, when a name, is one in it (or a directory of its own
    whose name no adapter in --adapters has: requests naming it could mean either)."""
    root = Path(adapters).expanduser()
    if not root.is_dir():
        raise UsageError(
            f"--adapters {adapters}: no such directory; give a directory holding one adapter per "
            "subdirectory (e.g. adapters/)"
        )
    if not adapter:
        return
    from lcflow.serving.adapter_names import is_plain_name  # keeps --help fast

    path = Path(adapter).expanduser()
    in_root = is_plain_name(adapter) and (root / adapter).is_dir()
    if not in_root and not path.is_dir():
        names = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
        raise UsageError(
            f"--adapter {adapter}: no adapter of that name in --adapters {adapters} "
            f"(it has: {', '.join(names) or 'none'}) and no such directory"
        )
    if not in_root and (root / path.name).is_dir() and path.resolve().parent != root.resolve():
        raise UsageError(
            f"--adapter {adapter} has the name of another adapter in --adapters {adapters}; "
            "rename one of them, or give --adapter as a name in --adapters"
        )


def check_file(path: Path, flag: str, what: str) -> None:
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"{flag} {path} {state}; give {what}")
