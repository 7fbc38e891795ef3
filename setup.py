"""Build hook only: compile proto/ into lcflow/proto_gen/ before packaging.

Everything else about the package is in pyproject.toml. The generated modules are not in
git; this hook makes `pip install -e .` and wheel builds produce them with grpcio-tools.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _load_generator():
    """Load lcflow/proto_gen/__init__.py by path: importing `lcflow` would need its runtime deps."""
    path = HERE / "lcflow" / "proto_gen" / "__init__.py"
    spec = importlib.util.spec_from_file_location("_lcflow_proto_gen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """build_py that runs grpc_tools.protoc first, so the stubs are packaged like any other file."""

    def run(self) -> None:
        generator = _load_generator()
        proto_root = HERE / "proto"
        if proto_root.is_dir():
            generator.generate(proto_root, HERE)
        elif not (HERE / "lcflow" / "proto_gen" / "lcflow").is_dir():
            raise RuntimeError("neither proto/ nor generated stubs found: build from a full source checkout")
        # An sdist without proto/ carries the stubs already, so there is nothing to generate.
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
