"""TLS, mutual TLS and bearer tokens for both hops (client -> sharer, sharer -> receiver).

Servers (`ServerSecurity`, from `lcflow serve` flags):

    --tls-cert / --tls-key      serve TLS; the files are re-read when they change (or on SIGHUP),
                                so a rotated certificate needs no restart
    --tls-client-ca             mutual TLS: every client must present a certificate from this CA
    --auth-token-file           every RPC must carry `authorization: Bearer <token>`

Clients (`ClientSecurity`: the sharer's channel to the receiver, `lcflow handoff`, the Python
client, `lcflow eval --services`):

    --tls-ca                    trust this CA for the server's certificate (TLS on)
    --tls-client-cert / -key    present this certificate (mutual TLS); the sharer makes a new
                                channel to the receiver when these files change (or on SIGHUP)
    --auth-token-file           send this token on every call

Only grpcio's own credentials are used; `lcflow certs make` writes a private CA and certificates
for local use. The grpc.health.v1 service stays open to token-less callers (load balancers and
probes carry no token), but not to plaintext ones when TLS is on: TLS is per port.

Nothing here imports torch: the Python client uses it too.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTH_HEADER = "authorization"


class SecurityConfigError(ValueError):
    """A certificate, key or token file that cannot be used, with what to do about it."""


# --- files that may be rotated --------------------------------------------------------------------


def _signature(path: str) -> tuple:
    """What changes when a file is replaced or rewritten (rename-into-place changes the inode)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(f"cannot read {what} {path}: {err.strerror or err}") from err


class TokenFile:
    """A bearer token kept in a file; re-read when the file changes, so it can be rotated live."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._token = b""
        self.value()  # a missing or empty file is an error at start, not at the first call

    def value(self) -> bytes:
        try:
            signature = _signature(self.path)
        except OSError:
            if self._token:  # mid-rotation (file briefly gone): keep the last good token
                return self._token
            raise SecurityConfigError(f"token file {self.path} does not exist") from None
        with self._lock:
            if signature != self._signature:
                token = _read(self.path, "token file").strip()
                if not token:
                    if self._token:
                        log.warning("token file %s is empty; keeping the previous token", self.path)
                        return self._token
                    raise SecurityConfigError(f"token file {self.path} is empty; put the token in it")
                if b"\n" in token or b"\r" in token:
                    raise SecurityConfigError(f"token file {self.path} holds more than one line")
                self._token, self._signature = token, signature
            return self._token


# --- server side ----------------------------------------------------------------------------------


def _digest(value: bytes) -> bytes:
    # Compared as digests: compare_digest is constant-time only for equal lengths, and a digest
    # has one length whatever the caller sent.
    return hashlib.sha256(value).digest()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for every RPC without `authorization: Bearer <token>` (health excepted).

    The check runs before the method's handler sees a single message, and for unknown methods
    too, so a caller without the token learns nothing about what the server serves."""

    def __init__(self, token: TokenFile):
        self.token = token

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == AUTH_HEADER), None)
        if given is not None:
            value = given.encode() if isinstance(given, str) else given
            if hmac.compare_digest(_digest(value), _digest(b"Bearer " + self.token.value())):
                return continuation(handler_call_details)
        reason = (
            "no bearer token: send metadata 'authorization: Bearer <token>' "
            "(lcflow handoff --auth-token-file FILE)"
            if given is None
            else "the bearer token is wrong"
        )
        log.warning("refused %s: %s", handler_call_details.method, reason)
        return _deny(continuation(handler_call_details), reason)


def _deny(handler, reason: str):
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading a message."""

    def deny(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    streaming_in = handler is not None and handler.request_streaming
    streaming_out = handler is not None and handler.response_streaming
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(streaming_in, streaming_out)]
    return make(deny)


def _check_key_pair(cert_pem: bytes, key_pem: bytes, cert_path: str, key_path: str) -> None:
    """A key that does not belong to its certificate fails every handshake with an opaque error;
    say so plainly instead (and, when rotating, keep serving the old pair)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise SecurityConfigError(f"{cert_path} is not a PEM certificate ({err})") from err
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise SecurityConfigError(f"{key_path} is not an unencrypted PEM private key ({err})") from err
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.PEM, raw) != key.public_key().public_bytes(
        serialization.Encoding.PEM, raw
    ):
        raise SecurityConfigError(f"the key {key_path} does not belong to the certificate {cert_path}")


def _check_ca(ca_pem: bytes, path: str) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as err:
        raise SecurityConfigError(f"{path} is not a PEM CA certificate ({err})") from err


class CertificateFiles:
    """The server's certificate, key and (mutual TLS) client CA, re-read when any of them changes.

    grpc calls `fetch` before every new TLS handshake: it returns a new configuration when the
    files changed since the last one (or `reload()` was called, on SIGHUP), else None, which
    keeps the current one. A half-written rotation (a key that does not match its certificate
    yet) is logged and skipped: the previous pair keeps serving until the files agree."""

    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._force = False
        self.loads = 0  # configurations handed to grpc (the first one included)
        self.initial = self._load()

    def _paths(self) -> list[str]:
        return [p for p in (self.cert, self.key, self.client_ca) if p]

    def _load(self) -> grpc.ServerCertificateConfiguration:
        signature = (
            tuple(_signature(p) for p in self._paths()) if all(map(os.path.exists, self._paths())) else None
        )
        cert = _read(self.cert, "certificate")
        key = _read(self.key, "private key")
        _check_key_pair(cert, key, self.cert, self.key)
        ca = None
        if self.client_ca:
            ca = _read(self.client_ca, "client CA")
            _check_ca(ca, self.client_ca)
        self._signature = signature
        self.loads += 1
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self) -> None:
        """Re-read the files at the next handshake even if they look unchanged (SIGHUP)."""
        self._force = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                signature = tuple(_signature(p) for p in self._paths())
            except OSError:
                return None  # a file is briefly missing mid-rotation: keep what we have
            if signature == self._signature and not self._force:
                return None
            self._force = False
            try:
                config = self._load()
            except SecurityConfigError as err:
                log.warning(
                    "certificate files changed but cannot be used yet (%s); keeping the old ones", err
                )
                self._signature = signature  # do not retry on every handshake until they change again
                return None
            log.info("TLS certificate files reloaded (%s)", ", ".join(self._paths()))
            return config


@dataclass
class ServerSecurity:
    """How a server listens: plaintext or TLS (mutual when a client CA is given), with or without a token."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token_file: str = ""

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise SecurityConfigError(
                "--tls-client-ca (mutual TLS) needs TLS: give --tls-cert and --tls-key too"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def authenticates_clients(self) -> bool:
        return bool(self.tls_client_ca or self.auth_token_file)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenAuthInterceptor(TokenFile(self.auth_token_file))] if self.auth_token_file else []

    def add_port(self, server: grpc.Server, address: str) -> tuple[int, CertificateFiles | None]:
        """Listen on `address`; returns (port, the watched certificate files or None)."""
        if not self.tls:
            return server.add_insecure_port(address), None
        files = CertificateFiles(self.tls_cert, self.tls_key, self.tls_client_ca)
        credentials = grpc.dynamic_ssl_server_credentials(
            files.initial, files.fetch, require_client_authentication=bool(self.tls_client_ca)
        )
        return server.add_secure_port(address, credentials), files

    def describe(self) -> str:
        parts = ["mutual TLS" if self.tls_client_ca else "TLS" if self.tls else "plaintext"]
        if self.auth_token_file:
            parts.append("bearer token")
        return " + ".join(parts)


# --- client side ----------------------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call. An interceptor, not call credentials:
    grpc sends call credentials only over TLS, and a token over a plaintext hop inside a private
    network is still worth having. Calls are passed through as they are, so they keep cancel()."""

    def __init__(self, token: TokenFile):
        self.token = token

    def _details(self, details):
        metadata = [*(details.metadata or ()), (AUTH_HEADER, "Bearer " + self.token.value().decode())]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


@dataclass
class ClientSecurity:
    """How a client connects: TLS when a CA is given (mutual with a client certificate and key),
    a bearer token when a token file is given. All files are read and checked here, at start."""

    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    auth_token_file: str = ""
    tls_server_name: str = ""  # expected name in the server's certificate, when not the target's host

    def __post_init__(self):
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise SecurityConfigError(
                "a client certificate needs both --tls-client-cert and --tls-client-key"
            )
        if self.tls_client_cert and not self.tls_ca:
            raise SecurityConfigError("--tls-client-cert (mutual TLS) needs --tls-ca, the CA of the server")
        self._token = TokenFile(self.auth_token_file) if self.auth_token_file else None

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca)

    def files_signature(self) -> tuple | None:
        """What changes when the CA, client certificate or key file is rotated (None while one
        is briefly missing). A channel's credentials are fixed when it is made, so a long-lived
        client compares this to decide when to make a new channel."""
        try:
            return tuple(_signature(p) for p in (self.tls_ca, self.tls_client_cert, self.tls_client_key) if p)
        except OSError:
            return None

    def credentials(self) -> grpc.ChannelCredentials:
        ca = _read(self.tls_ca, "CA certificate")
        _check_ca(ca, self.tls_ca)
        cert = key = None
        if self.tls_client_cert:
            cert = _read(self.tls_client_cert, "client certificate")
            key = _read(self.tls_client_key, "client key")
            _check_key_pair(cert, key, self.tls_client_cert, self.tls_client_key)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel(self, target: str, options: list | tuple = ()) -> grpc.Channel:
        options = list(options)
        if self.tls:
            if self.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            channel = grpc.secure_channel(target, self.credentials(), options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        if self._token is not None:
            channel = grpc.intercept_channel(channel, TokenClientInterceptor(self._token))
        return channel


# --- flags ----------------------------------------------------------------------------------------

CLIENT_FLAGS = {
    "tls_ca": ("LCFLOW_TLS_CA", "CA certificate (PEM) to verify the server with; turns TLS on"),
    "tls_client_cert": ("LCFLOW_TLS_CLIENT_CERT", "client certificate (PEM) for mutual TLS"),
    "tls_client_key": ("LCFLOW_TLS_CLIENT_KEY", "private key (PEM) of --tls-client-cert"),
    "auth_token_file": ("LCFLOW_AUTH_TOKEN_FILE", "file holding the bearer token to send on every call"),
    "tls_server_name": (
        "LCFLOW_TLS_SERVER_NAME",
        "name the server's certificate must carry, when it is not the address's host",
    ),
}


def add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-client-cert, --tls-client-key, --auth-token-file, --tls-server-name, each
    defaulting to its LCFLOW_* variable."""
    group = parser.add_argument_group("security (TLS, mutual TLS, bearer token)")
    for name, (env, text) in CLIENT_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            default=os.environ.get(env, ""),
            metavar="FILE" if "name" not in name else "NAME",
            help=f"{text} [env {env}]",
        )


def client_security_from_args(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity(**{name: getattr(args, name) or "" for name in CLIENT_FLAGS})
