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

How a request names an adapter is lcflow.serving.adapter_names; what a directory holds,
lcflow.serving.inspection; the ListAdapters RPC and the servicers' shared base,
lcflow.serving.servicer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lcflow.adapter.config import CONFIG_NAME
from lcflow.core.kv import ModelIdentity
from lcflow.serving.adapter_names import check_plain_name, is_plain_name, resolve_adapter_name
from lcflow.serving.inspection import AdapterInfo, inspect_adapter, loaded_bytes
from lcflow.serving.server import ServiceError

log = logging.getLogger(__name__)


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
        default first, then the others by their model card's exact match, best first, then by
        name. Why the card: a directory such as adapters/ holds several adapters of one mode for a
        pair (a pruned copy, an older design), and a request that names none should get the one
        that measured best, not the first letter. EMs are compared only on one task: the task
        most of these cards measured (facts-cross/test for the shipped LCF-X adapters) ranks
        first, cards of other tasks (a long-document adapter's EM on long documents) after it,
        adapters without a card last. An EM on an easier task says nothing about this one."""
        with self._lock:
            self._scan()
            ordered = [self.default] if self.default is not None else []
            of_mode = [
                e
                for e in self._entries.values()
                if e is not self.default and e.info.usable and e.info.mode == mode
            ]
            measured = Counter(e.info.card_task for e in of_mode if e.info.card_em is not None)
            common = min(measured, key=lambda task: (-measured[task], task)) if measured else ""
            others = sorted(
                of_mode,
                key=lambda e: (
                    e.info.card_em is None,
                    e.info.card_task != common,
                    -(e.info.card_em or 0.0),
                    e.info.name,
                ),
            )
            return [e for e in ordered if e.info.usable and e.info.mode == mode] + others

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
