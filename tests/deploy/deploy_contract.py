"""What the deployment files must agree on (the services' flags, ports, the demo's models and
adapter), shared by the deploy tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
DEMO_ADAPTER = (
    "adapters/gemma3-to-gemma3-lcfx-compressed"  # in the repository; the image copies adapters/ here:
)
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
