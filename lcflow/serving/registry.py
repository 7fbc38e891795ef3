"""Many adapters per service: which adapters a sharer or receiver can use, loaded on first use and
kept under a memory bound.

A service runs one model and serves any number of adapters for it: its default (`--adapter`,
loaded with the model) and the subdirectories of `--adapters DIR`, one adapter each, PEFT-style
(as the repository's adapters/ is laid out). Each loaded adapter is only this service's half
(the sharer's encoder, the receiver's decoder) beside the one model they all share.

`AdapterRegistry` keeps them for a service:

- it lists every adapter from its config and its files' headers (never by loading weights), and
  marks one that cannot serve this model unusable, with the reason: another model, a missing
  half, a config it cannot read, too large for the bound;
- `pick` chooses one for a request: the one it names (INVALID_ARGUMENT for a name that is not a
  plain name or leads out of the directory, NOT_FOUND naming the available ones for an unknown
  one, FAILED_PRECONDITION for an unusable one), or by the request's mode: the default if it has
  that mode, else the usable adapter of that mode with the best model-card EM (then by name);
- `lease` holds one for a handoff, loading it first if needed; while the loaded halves together
  exceed --adapter-memory-mb the least recently used are evicted, never one a handoff holds,
  nor the default (it is part of the loaded model).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lcflow.adapter.card import CODECS_BY_SIZE, accurate_codecs
from lcflow.adapter.config import CONFIG_NAME, AdapterConfig, AdapterMismatchError, service_half_file
from lcflow.adapter.reader import READER_CONFIG
from lcflow.core.kv import ModelIdentity
from lcflow.core.names import QUANTIZATIONS
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.serving.server import ServiceError, adapter_id, invalid, status_on_error

log = logging.getLogger(__name__)

ADAPTER_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_ADAPTER_NAME = 128
LOADED_BYTES_PER_PARAMETER = 4  # halves are loaded in float32 (LatentAdapter.from_pretrained)
MAX_SAFETENSORS_HEADER = 100 << 20
CARD_NAME = "model_card.json"


# --- names ------------------------------------------------------------------------------------


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


# --- what an adapter is, read from its files ------------------------------------------------------


@dataclass
class AdapterInfo:
    """One adapter as ListAdapters reports it; `reason` says why this service cannot use it."""

    name: str
    path: Path | None
    mode: str = ""
    sharer: ModelIdentity | None = None
    receiver: ModelIdentity | None = None
    adapter_id: str = ""
    parameters: int = 0  # all weight files
    size_bytes: int = 0  # all weight files, on disk
    memory_bytes: int = 0  # this service's half, loaded (measured once it is)
    card_em: float | None = None
    # the wire codecs its model card allows, largest first, its choice last (card_codecs)
    card_codecs: tuple[str, ...] = ("none",)
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not self.reason


def safetensors_parameters(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone (8 bytes of length, then JSON)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path.name}: a header of {length} bytes is not a safetensors header")
        header = json.loads(f.read(length))
    return sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")


def card_em(directory: Path, mode: str) -> float | None:
    """The exact match its model card reports (results[eval method].em), None without a card."""
    try:
        card = json.loads((directory / CARD_NAME).read_text())
        results = card.get("results") or {}
        row = results.get((card.get("eval") or {}).get("method") or mode) or results.get(mode) or {}
        return float(row["em"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def card_codecs(directory: Path) -> tuple[str, ...]:
    """The quantizations a sharer's `--codec auto` may send this adapter's latents with, largest
    first: bf16 ("none"), then each codec up to the card's choice that the card measured within
    1 EM point of bf16, ending with that choice. A codec with a smaller one of the same bytes also
    in the list is left out (int4-hadamard beside int4: the same bytes and a rotation at each end,
    so it can never cost less). The last is the card's choice (card "codec": {"default": ...}, the
    smallest codec measured within 1 EM point of bf16). ("none",) without a readable card or a
    known choice, so that an unreadable card can only make the packet larger, never lossy; the
    choice alone where the card has no EMs to judge the others by."""
    try:
        codec = json.loads((directory / CARD_NAME).read_text())["codec"]
        chosen = codec["default"]
    except (OSError, ValueError, KeyError, TypeError):
        return ("none",)
    if chosen not in QUANTIZATIONS or chosen not in CODECS_BY_SIZE:
        return ("none",)
    try:
        measured = set(accurate_codecs({name: float(em) for name, em in codec["em"].items()}))
    except (ValueError, KeyError, TypeError, AttributeError):  # no EMs: the choice alone
        return (chosen,)
    larger = CODECS_BY_SIZE[: CODECS_BY_SIZE.index(chosen)]
    codecs = [c for c in larger if c == "none" or c in measured] + [chosen]
    if "int4" in codecs and "int4-hadamard" in codecs:
        codecs.remove("int4-hadamard")
    return tuple(codecs)


def c2c_rope_problem(config: AdapterConfig) -> str:
    """Why a receiver cannot serve this C2C adapter's sharer RoPE ("" when it can)."""
    from lcflow.adapter.c2c import stored_sharer_rope

    try:
        stored_sharer_rope(config)
    except ValueError as err:
        return str(err)
    return ""


def inspect_adapter(directory: Path, name: str, role: str, identity: ModelIdentity | None) -> AdapterInfo:
    """What `directory` holds and whether a `role` service running `identity` can use it. Reads
    the config, the weight files' headers and the card; never raises for a bad directory."""
    info = AdapterInfo(name, directory)
    if (directory / READER_CONFIG).is_file():  # lcflow.adapter.reader: named per request, never by mode
        info.mode = "text-reader"
        info.reason = (
            "a text reader: a TEXT handoff of forwarded text names it (text_reader); it decodes no latents"
        )
        return info
    try:
        config = AdapterConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, not an object, ...
        info.reason = f"its {CONFIG_NAME} cannot be used: {err}"
        return info
    info.mode, info.sharer, info.receiver = config.mode, config.sharer, config.receiver
    info.adapter_id = adapter_id(config.to_dict())
    info.card_em = card_em(directory, config.mode)
    info.card_codecs = card_codecs(directory)
    try:
        weights = sorted(directory.glob("*.safetensors"))
        counts = {path.name: safetensors_parameters(path) for path in weights}
        info.size_bytes = sum(path.stat().st_size for path in weights)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as err:
        info.reason = f"its weights cannot be read: {err}"
        return info
    info.parameters = sum(counts.values())
    half = service_half_file(config.mode, role)
    info.memory_bytes = counts.get(half, 0) * LOADED_BYTES_PER_PARAMETER
    if half is not None and half not in counts:
        info.reason = f"it has no {half}, the half a {role} loads"
    elif config.mode == "c2c" and role == "receiver" and (why := c2c_rope_problem(config)):
        info.reason = why
    elif identity is not None:
        try:
            config.check_models(**{role: identity})
        except AdapterMismatchError as err:
            info.reason = str(err)
    return info


def loaded_bytes(module) -> int:
    """Bytes held by a loaded adapter half (its parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# --- the registry ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    info: AdapterInfo
    stamp: tuple = ()  # its files' names and modification times, to notice a changed adapter
    engine: object | None = None  # the service's engine with this adapter, while loaded
    pinned: bool = False  # the default: loaded with the model, never evicted
    in_root: bool = True  # inside --adapters (so the other service finds it by name)
    in_use: int = 0  # handoffs holding it now
    last_used: int = 0  # when it was last leased, on the registry's clock
    load_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Choice:
    """The adapter a request runs with, and how it was chosen: "request" (it named it),
    "default" (the service's --adapter has the requested mode) or "mode" (the usable adapter
    of the requested mode that measured best, `AdapterRegistry.candidates`)."""

    entry: _Entry
    how: str

    @property
    def name(self) -> str:
        return self.entry.info.name

    @property
    def wire_name(self) -> str:
        """The name the sharer passes on (LatentHeader.meta "adapter"): none for a default
        outside --adapters that the request did not name, so a receiver whose --adapter lives
        elsewhere still finds it, by its id, as before --adapters existed."""
        return self.name if self.how == "request" or self.entry.in_root else ""


@dataclass
class AdapterView:
    """A snapshot of one adapter for listing."""

    info: AdapterInfo
    loaded: bool
    is_default: bool


class AdapterRegistry:
    """The adapters one service can use (see the module's docstring).

    `build(directory)` makes the service's engine with that adapter's half on the already loaded
    model (and raises when it does not fit). `attach(engine)` is called once the model is loaded:
    before that nothing can be checked against it. Thread-safe."""

    def __init__(
        self,
        role: str,
        root: str = "",
        memory_limit_bytes: int = 512 << 20,
        build: Callable[[Path], object] | None = None,
    ):
        self.role, self.build = role, build
        self.root = Path(root).resolve() if root else None
        self.memory_limit = int(memory_limit_bytes)
        self.identity: ModelIdentity | None = None
        self.default: _Entry | None = None
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._clock = itertools.count(1)

    @classmethod
    def for_service(cls, config, build: Callable[[Path], object]) -> AdapterRegistry:
        """The registry a ServiceConfig asks for (--adapters, --adapter-memory-mb)."""
        return cls(config.role, config.adapters, int(config.adapter_memory_mb * (1 << 20)), build)

    # --- set-up ----------------------------------------------------------------------------------

    def attach(self, engine) -> None:
        """Take the loaded model (its identity) and its default adapter, if any; then read the
        directory. Only the first call counts."""
        if self.identity is not None:
            return
        with self._lock:
            if self.identity is not None:
                return
            if engine.adapter is not None:
                self.default = self._default_entry(engine)
                self._entries[self.default.info.name] = self.default
            self.identity = engine.identity
            self._scan()

    def _default_entry(self, engine) -> _Entry:
        path = Path(engine.adapter_path).resolve() if getattr(engine, "adapter_path", None) else None
        in_root = path is not None and self.root is not None and path.parent == self.root
        config = engine.adapter.config
        name = path.name if path is not None else f"{config.mode}-default"
        info = inspect_adapter(path, name, self.role, None) if path is not None else AdapterInfo(name, None)
        info.mode, info.sharer, info.receiver = config.mode, config.sharer, config.receiver
        info.adapter_id, info.reason = engine.adapter_id, ""  # it loaded: it fits
        info.memory_bytes = loaded_bytes(engine.adapter)
        return _Entry(info, engine=engine, pinned=True, in_root=in_root, last_used=next(self._clock))

    def engine_ready(self, engine, preload: bool) -> None:
        """A service's model has loaded: read the adapters against it, and with --preload load them."""
        self.attach(engine)
        if preload:
            self.preload()

    def preload(self) -> None:
        """--preload: load every usable adapter now, by name, as far as the memory bound allows."""
        with self._lock:
            self._scan()
            waiting = [e for _, e in sorted(self._entries.items()) if e.info.usable and e.engine is None]
        for entry in waiting:
            if self.used_bytes() + entry.info.memory_bytes > self.memory_limit:
                log.info("preload: adapter %r left for later (no room under the bound)", entry.info.name)
                continue
            try:
                with self.lease(entry):
                    pass
            except ServiceError as err:
                log.warning("preload: %s", err.details)

    # --- the directory ---------------------------------------------------------------------------

    def _scan(self) -> None:
        """With the lock held: read the directory again; new or changed adapters are inspected,
        vanished ones forgotten (unless loaded or in use)."""
        if self.root is None or self.identity is None:
            return
        try:
            children = sorted(self.root.iterdir())
        except OSError as err:
            log.warning("cannot read the adapter directory %s: %s", self.root, err)
            return
        seen = set()
        for child in children:
            name = child.name
            try:
                resolved = child.resolve()
            except (OSError, RuntimeError):  # a symlink loop: nothing to list
                continue
            inside = resolved != self.root and resolved.is_relative_to(self.root)
            if not is_plain_name(name) or not resolved.is_dir():
                continue
            if inside and not (resolved / CONFIG_NAME).is_file():
                continue  # not an adapter (no config): not listed
            seen.add(name)
            entry = self._entries.get(name)
            if entry is not None and (entry.pinned or entry.engine is not None or entry.in_use):
                continue
            stamp = _stamp(resolved) if inside else ()
            if entry is not None and entry.stamp == stamp:
                continue
            if inside:
                info = self._inspect(resolved, name)
            else:  # nothing outside the directory is read
                info = AdapterInfo(name, None, reason="it resolves outside the adapter directory; refused")
            self._entries[name] = _Entry(info, stamp)
        for name, entry in list(self._entries.items()):
            if name not in seen and not entry.pinned and entry.engine is None and not entry.in_use:
                del self._entries[name]

    def _inspect(self, directory: Path, name: str) -> AdapterInfo:
        info = inspect_adapter(directory, name, self.role, self.identity)
        if info.usable and info.memory_bytes > self.memory_limit:
            info.reason = (
                f"its {self.role} half needs {info.memory_bytes / 2**20:.1f} MB loaded, more than "
                f"--adapter-memory-mb {self.memory_limit / 2**20:g}"
            )
        return info

    # --- choosing ---------------------------------------------------------------------------------

    def resolve(self, name: str) -> _Entry:
        """The adapter a request names (usable or not): INVALID_ARGUMENT for a name that is not a
        plain name or leads out of the directory, NOT_FOUND naming the available ones."""
        check_plain_name(name)
        with self._lock:
            if self.default is not None and name == self.default.info.name:
                return self.default
            if self.root is None:
                own = f"its --adapter {self.default.info.name!r}" if self.default else "no adapter"
                raise ServiceError(
                    grpc.StatusCode.NOT_FOUND,
                    f"no adapter {name!r} here: this {self.role} serves only {own}; start it with "
                    "--adapters DIR to let requests choose adapters in DIR",
                )
            try:
                resolve_adapter_name(self.root, name)
            except ServiceError as err:
                if err.code != grpc.StatusCode.NOT_FOUND:
                    raise
                raise self._not_found(name) from None
            if name not in self._entries:
                self._scan()
            entry = self._entries.get(name)
            if entry is None:
                raise self._not_found(name)
            return entry

    def _not_found(self, name: str) -> ServiceError:
        usable = [n for n, e in sorted(self._entries.items()) if e.info.usable]
        unusable = [n for n, e in sorted(self._entries.items()) if not e.info.usable]
        available = f"available: {', '.join(usable)}" if usable else "none is usable here"
        if unusable:
            available += f" (unusable here: {', '.join(unusable)})"
        return ServiceError(
            grpc.StatusCode.NOT_FOUND, f"no adapter {name!r} in the adapter directory; {available}"
        )

    def candidates(self, mode: str) -> list[_Entry]:
        """The usable adapters of `mode` in the order a request naming none tries them: the
        default first, then the others by their model card's exact match, best first (an
        adapter without a card last), then by name. Why the card: a directory such as adapters/
        holds several adapters of one mode for a pair (a pruned copy, an older design), and a
        request that names none should get the one that measured best, not the first letter."""
        with self._lock:
            self._scan()
            ordered = [self.default] if self.default is not None else []
            others = sorted(
                (e for e in self._entries.values() if e is not self.default),
                key=lambda e: (e.info.card_em is None, -(e.info.card_em or 0.0), e.info.name),
            )
            return [e for e in ordered + others if e.info.usable and e.info.mode == mode]

    def pick(self, name: str, mode: str, fits: Callable[[AdapterInfo], bool] | None = None) -> Choice:
        """The adapter for a request of `mode` naming `name` (or none). `fits(info)`: whether it
        also fits the other service's model; asked only when more than one adapter could serve."""
        if name:
            entry = self.resolve(name)
            if not entry.info.usable:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"adapter {name!r} cannot be used here: {entry.info.reason}",
                )
            if entry.info.mode != mode:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"adapter {name!r} is a {entry.info.mode} adapter but the request asks for {mode}; "
                    f"name a {mode} adapter, or none to let the service choose",
                )
            return Choice(entry, "request")
        found = self.candidates(mode)
        if fits is not None and len(found) > 1:
            fitting = [e for e in found if fits(e.info)]
            if not fitting:
                names = ", ".join(e.info.name for e in found)
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"none of this {self.role}'s {mode} adapters ({names}) was made for the other "
                    "service's model; give both services adapters for this pair",
                )
            found = fitting
        if not found:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, self._no_adapter(mode))
        return Choice(found[0], "default" if found[0] is self.default else "mode")

    def for_header(self, name: str, mode: str, latent_adapter_id: str) -> Choice:
        """Receiver: the adapter that decodes latents of `mode` whose header names `name` (or
        none: then the usable adapter of that mode with the header's adapter id, the default
        first; else the first candidate, which the identity check then refuses, naming both)."""
        if name:
            return self.pick(name, mode)
        found = self.candidates(mode)
        if not found:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, self._no_adapter(mode))
        entry = next((e for e in found if e.info.adapter_id == latent_adapter_id), found[0])
        return Choice(entry, "default" if entry is self.default else "mode")

    def require_mode(self, mode: str) -> None:
        """FAILED_PRECONDITION (as `pick` would give) unless some usable adapter has `mode`."""
        if not self.candidates(mode):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, self._no_adapter(mode))

    def _no_adapter(self, mode: str) -> str:
        with self._lock:
            have = [f"{n} ({e.info.mode or 'unreadable'})" for n, e in sorted(self._entries.items())]
        return (
            f"mode {mode} needs a {mode} adapter but this {self.role} has "
            f"{'none usable (' + ', '.join(have) + ')' if have else 'no adapter'}; start it with "
            f"--adapter pointing at one or --adapters DIR holding one, or use TEXT or NONE"
        )

    # --- loading and eviction --------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, entry: _Entry) -> Iterator[object]:
        """Hold an adapter for one handoff: its engine, loaded first if it is not; it cannot be
        evicted until the block ends. FAILED_PRECONDITION when loading it fails (it is then
        listed as unusable, with the error, until its files change)."""
        engine = self._acquire(entry)
        try:
            yield engine
        finally:
            with self._lock:
                entry.in_use -= 1
                self._shrink()

    def _acquire(self, entry: _Entry):
        with entry.load_lock:  # one load per adapter; others wait for it, not load it again
            with self._lock:
                if entry.engine is not None:
                    entry.in_use += 1
                    entry.last_used = next(self._clock)
                    return entry.engine
                if not entry.info.usable:  # a load that failed while this request waited
                    raise ServiceError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"adapter {entry.info.name!r} cannot be used here: {entry.info.reason}",
                    )
            engine = self._load(entry)  # outside the registry's lock: other adapters stay available
            with self._lock:
                entry.engine = engine
                entry.info.memory_bytes = loaded_bytes(engine.adapter)
                entry.in_use += 1
                entry.last_used = next(self._clock)
                self._shrink()
                return engine

    def _load(self, entry: _Entry):
        name = entry.info.name
        try:
            engine = self.build(entry.info.path)
        except Exception as err:  # other models, damaged or half-written weights: unusable, not a crash
            with self._lock:
                entry.info.reason = f"loading it failed: {err}"
            log.warning("adapter %r cannot be loaded: %s", name, err)
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"adapter {name!r} cannot be used here: {entry.info.reason}",
            ) from err
        log.info("loaded adapter %r (%s) from %s", name, entry.info.mode, entry.info.path)
        return engine

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.info.memory_bytes for e in self._loaded())

    def _loaded(self) -> list[_Entry]:
        entries = list(self._entries.values())
        if self.default is not None and self.default not in entries:
            entries.append(self.default)
        return [e for e in entries if e.engine is not None]

    def _shrink(self) -> None:
        """With the lock held: evict idle loaded adapters, least recently used first, until the
        loaded ones fit the bound (or only the default and adapters in use are left)."""
        used = sum(e.info.memory_bytes for e in self._loaded())
        idle = sorted((e for e in self._loaded() if not e.pinned and not e.in_use), key=lambda e: e.last_used)
        for entry in idle:
            if used <= self.memory_limit:
                break
            entry.engine = None
            used -= entry.info.memory_bytes
            log.info(
                "evicted adapter %r (least recently used; %.1f MB)",
                entry.info.name,
                entry.info.memory_bytes / 2**20,
            )
        if used > self.memory_limit:
            log.info(
                "adapters hold %.1f MB, above the bound of %.1f MB, while handoffs use them",
                used / 2**20,
                self.memory_limit / 2**20,
            )

    # --- listing ----------------------------------------------------------------------------------

    def list(self) -> list[AdapterView]:
        """Every adapter, the default first, then by name."""
        with self._lock:
            self._scan()
            ordered = [self.default] if self.default is not None else []
            ordered += [e for _, e in sorted(self._entries.items()) if e is not self.default]
            return [AdapterView(_copy(e.info), e.engine is not None, e is self.default) for e in ordered]

    def loaded_names(self) -> list[str]:
        with self._lock:
            return sorted(e.info.name for e in self._loaded())


def _copy(info: AdapterInfo) -> AdapterInfo:
    return AdapterInfo(**{name: getattr(info, name) for name in info.__dataclass_fields__})


def _stamp(directory: Path) -> tuple:
    try:
        return tuple(
            (p.name, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(directory.iterdir())
            if p.suffix in (".json", ".safetensors")
        )
    except OSError:
        return ()


# --- ListAdapters ---------------------------------------------------------------------------------


def model_proto(identity: ModelIdentity | None) -> pb.ModelIdentity:
    if identity is None:
        return pb.ModelIdentity()
    return pb.ModelIdentity(name=identity.name, hash=identity_hash(identity))


def list_adapters_response(registry: AdapterRegistry, identity: ModelIdentity) -> pb.ListAdaptersResponse:
    """The ListAdapters answer of a service running `identity` with `registry`."""
    adapters = []
    for view in registry.list():
        info = view.info
        message = pb.AdapterInfo(
            name=info.name,
            mode=info.mode,
            sharer=model_proto(info.sharer),
            receiver=model_proto(info.receiver),
            parameters=info.parameters,
            size_bytes=info.size_bytes,
            memory_bytes=info.memory_bytes,
            loaded=view.loaded,
            usable=info.usable,
            reason=info.reason,
            is_default=view.is_default,
        )
        if info.card_em is not None:
            message.card_em = info.card_em
        adapters.append(message)
    return pb.ListAdaptersResponse(
        role=registry.role,
        model=model_proto(identity),
        default_adapter=registry.default.info.name if registry.default is not None else "",
        adapters=adapters,
        memory_limit_bytes=registry.memory_limit,
        memory_used_bytes=registry.used_bytes(),
    )


class ModelService:
    """What the sharer and receiver services share: a model that loads in the background
    (`engine`, None until then) and the adapters that sit on it (`adapters`).

    A subclass sets `role` ("sharer" or "receiver", also the name of its engine's model
    attribute: SharerEngine.sharer, ReceiverEngine.receiver) and `engine_class` (whose
    `from_loaded(model, tokenizer, adapter_dir, name)` puts another adapter's half on the model)."""

    role: str
    engine_class: type
    engine = None
    adapters: AdapterRegistry

    def ready(self):
        """The loaded engine; UNAVAILABLE while the model is still loading."""
        if self.engine is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"the {self.role} model is still loading; retry shortly"
            )
        self.adapters.attach(self.engine)  # once: the registry checks adapters against this model
        return self.engine

    def engine_ready(self) -> None:
        """The model is loaded: read the adapters (and load them all with --preload)."""
        self.adapters.engine_ready(self.engine, self.config.preload)

    def _engine_with(self, adapter_dir: Path):
        """The loaded model with another adapter's half (checked against the model)."""
        engine = self.ready()
        loaded = getattr(engine, self.role)  # the Sharer or Receiver: its model and tokenizer
        return self.engine_class.from_loaded(
            loaded.model, loaded.tokenizer, str(adapter_dir), engine.identity.name
        )

    def ListAdapters(self, request, context):
        with status_on_error(context, "ListAdapters"):
            return list_adapters_response(self.adapters, self.ready().identity)
