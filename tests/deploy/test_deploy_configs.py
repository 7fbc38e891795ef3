"""Deployment configuration: the Docker image, the compose demo and the Kubernetes manifests.

Nothing here builds an image or talks to a cluster. What is checked, offline:
- docker/Dockerfile and docker/healthcheck.py: tests/deploy/test_dockerfile.py.
- docker/compose.yaml (+ compose.gpu.yaml, compose.jaeger.yaml): parsed properties, and
  `docker-compose config` when a compose tool is installed (Debian's `docker-compose` 1.29 reads
  these compose-spec files). tests/deploy/test_compose_demo.py builds the image and runs the compose demo.
- deploy/k8s: parsed properties of every object, strict JSON-schema validation against pinned
  Kubernetes versions with `kubernetes-validate` (bundled schemas, no network), and the
  `kubectl kustomize` rendering when kubectl is installed.
Checks whose tool is missing are skipped with the install command in the reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
from deploy_contract import (
    ADAPTERS_IN_IMAGE,
    CLIENT_ONLY_ENV,
    COMPOSE,
    COMPOSE_GPU,
    COMPOSE_JAEGER,
    CONTRACT_ENV,
    DEMO_ADAPTER_IN_IMAGE,
    DEMO_MODELS,
    DEVICES,
    DOCKERFILE,
    DTYPES,
    K8S,
    K8S_VERSIONS,
    PORTS,
    ROOT,
    _check_env_names,
)

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deploy configs: pip install pyyaml")


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
