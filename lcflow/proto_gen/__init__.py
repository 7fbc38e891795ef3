"""Generated gRPC / protobuf code for proto/lcflow/v1/lcflow.proto.

The modules under here are produced by the build (setup.py runs `generate()` before
packaging) and are never committed or edited by hand. Import them as

    from lcflow.proto_gen.lcflow.v1 import lcflow_pb2, lcflow_pb2_grpc

In a source checkout, regenerate them after editing the .proto with

    python -m lcflow.proto_gen

protoc is told that the .proto lives at `lcflow/proto_gen/lcflow/v1/lcflow.proto` (a virtual
include path), so the generated `lcflow_pb2_grpc.py` imports `lcflow.proto_gen.lcflow.v1`
and needs no rewriting. The protobuf *package* stays `lcflow.v1`, which is what the
wire and gRPC method names (`/lcflow.v1.Receiver/Receive`) use.

This file imports nothing but the standard library, so setup.py can load it on its own.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
# <root>/lcflow/proto_gen -> <root>: where `lcflow/` sits, so protoc writes lcflow/proto_gen/...
SOURCE_ROOT = PACKAGE_DIR.parent.parent
DEFAULT_PROTO_ROOT = SOURCE_ROOT / "proto"
# The directory inside the package that mirrors proto/: proto/lcflow/v1 -> proto_gen/lcflow/v1.
VIRTUAL_PREFIX = "lcflow/proto_gen"


def generate(proto_root: Path | str | None = None, out_root: Path | str | None = None) -> list[Path]:
    """Compile every .proto under `proto_root` into `out_root`/lcflow/proto_gen; returns the files written.

    proto_root: the directory holding lcflow/v1/*.proto (default: the checkout's proto/).
    out_root: the directory that contains the `lcflow` package (default: this checkout).
    """
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)

    proto_root = Path(proto_root or DEFAULT_PROTO_ROOT).resolve()
    out_root = Path(out_root or SOURCE_ROOT).resolve()
    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(
            f"no .proto files under {proto_root}: run this from a source checkout that has proto/"
        )
    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    virtual = [f"{VIRTUAL_PREFIX}/{p.relative_to(proto_root).as_posix()}" for p in protos]
    args = [
        "grpc_tools.protoc",
        f"-I{VIRTUAL_PREFIX}={proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *virtual,
    ]
    # protoc resolves virtual names against the -I mappings, so run it from out_root.
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {', '.join(virtual)}")
    written: list[Path] = []
    for name in virtual:
        package_dir = out_root / Path(name).parent
        # Regular packages (not namespace ones), so `find_packages` and type checkers see them.
        for directory in [package_dir, *package_dir.parents]:
            if directory == out_root / VIRTUAL_PREFIX or out_root / VIRTUAL_PREFIX not in directory.parents:
                break
            (directory / "__init__.py").touch()
        stem = Path(name).stem
        written += [package_dir / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    log.info("generated %s", ", ".join(str(p.relative_to(out_root)) for p in written))
    return written
