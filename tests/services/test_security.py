"""TLS, mutual TLS and bearer tokens on both hops (client -> sharer -> receiver), on loopback with
tiny models: what is refused gets the status a client can act on, what is allowed works end to end,
and rotated certificate and token files are picked up without a restart."""

from __future__ import annotations

import shutil
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port, tiny_adapter_dir
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_helpers import start_services

from lcflow.client import HandoffClient
from lcflow.commands.certs import make_certs
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2 as pb
from lcflow.proto_gen.lcflow.v1 import lcflow_pb2_grpc as pb_grpc
from lcflow.serving.config import ServiceConfig
from lcflow.serving.security import CertificateFiles, ClientSecurity, SecurityConfigError, TokenFile

CONTEXT = "Mira Volkov lives in Oslo. Lior Senn plays the violin."
PROMPT = "Where does Mira Volkov live?"
HOSTS = ["localhost", "127.0.0.1"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    make_certs(directory, HOSTS)
    return directory


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """Certificates from another CA: valid, but not trusted by anything using `certs`."""
    directory = tmp_path_factory.mktemp("other-certs")
    make_certs(directory, HOSTS)
    return directory


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokens")
    for name, token in {
        "sharer": "s3cret-for-the-sharer",
        "receiver": "another-one-for-the-receiver",
    }.items():
        (directory / name).write_text(token + "\n")
    (directory / "wrong").write_text("not-the-token\n")
    return directory


@pytest.fixture(scope="module")
def adapter_dir(tiny_pair, tmp_path_factory):
    return tiny_adapter_dir(tiny_pair, tmp_path_factory.mktemp("adapter-lcfx"))


def SecurePair(tiny_pair, adapter_dir, receiver: dict, sharer: dict):  # noqa: N802 (reads as the pair it starts)
    """Receiver + sharer with the given security settings on each (ServiceConfig fields)."""
    return start_services(
        tiny_pair, str(adapter_dir), InMemorySpanExporter(), sharer=sharer, receiver=receiver
    )


def handoff_status(target: str, security: ClientSecurity | None = None, mode: str = "lcfx"):
    """(status code, details, result) of one handoff through the sharer at `target`."""
    client = HandoffClient(target, timeout_s=30, security=security)
    try:
        result = client.handoff(PROMPT, mode=mode, context=CONTEXT, max_new_tokens=2)
    except grpc.RpcError as err:
        return err.code(), err.details(), None
    finally:
        client.close()
    return grpc.StatusCode.OK, "", result


def mtls(directory) -> dict:
    return {
        "tls_cert": str(directory / "server.pem"),
        "tls_key": str(directory / "server-key.pem"),
        "tls_client_ca": str(directory / "ca.pem"),
    }


def towards_receiver(ca_directory, client_directory) -> dict:
    """The sharer's settings for its channel to the receiver: trust this CA, present this client."""
    return {
        "receiver_tls_ca": str(ca_directory / "ca.pem"),
        "receiver_tls_client_cert": str(client_directory / "client.pem"),
        "receiver_tls_client_key": str(client_directory / "client-key.pem"),
    }


def client_mtls(directory, ca_directory=None) -> ClientSecurity:
    return ClientSecurity(
        tls_ca=str((ca_directory or directory) / "ca.pem"),
        tls_client_cert=str(directory / "client.pem"),
        tls_client_key=str(directory / "client-key.pem"),
    )


# --- mutual TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_pair(tiny_pair, adapter_dir, certs):
    sharer_side = {**mtls(certs), **towards_receiver(certs, certs)}
    running = SecurePair(tiny_pair, adapter_dir, mtls(certs), sharer_side)
    yield running
    running.stop()


def test_mtls_handoff_works_on_both_hops(mtls_pair, certs):
    for mode in ("lcfx", "text", "none"):
        code, details, result = handoff_status(mtls_pair.sharer, client_mtls(certs), mode)
        assert code == grpc.StatusCode.OK, details
        assert result.summary.mode == pb.Mode.Value(mode.upper().replace("LCFX", "LCF_X"))
    assert result.summary.timings.total > 0


def test_plaintext_client_is_refused_by_a_tls_server(mtls_pair):
    code, _, _ = handoff_status(mtls_pair.sharer)
    assert code == grpc.StatusCode.UNAVAILABLE
    receiver = pb_grpc.ReceiverStub(grpc.insecure_channel(mtls_pair.receiver))
    with pytest.raises(grpc.RpcError) as err:
        list(receiver.Receive(iter([]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(mtls_pair, certs, other_certs):
    # the client does not trust the server: the server's certificate is from a CA it does not know
    code, _, _ = handoff_status(mtls_pair.sharer, client_mtls(certs, ca_directory=other_certs))
    assert code == grpc.StatusCode.UNAVAILABLE
    # the server does not trust the client: its certificate is from another CA
    code, _, _ = handoff_status(mtls_pair.sharer, client_mtls(other_certs, ca_directory=certs))
    assert code == grpc.StatusCode.UNAVAILABLE
    # mutual TLS is required: TLS without a client certificate is not enough
    code, _, _ = handoff_status(mtls_pair.sharer, ClientSecurity(tls_ca=str(certs / "ca.pem")))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert handoff_status(mtls_pair.sharer, client_mtls(certs))[0] == grpc.StatusCode.OK  # still serves


def test_the_sharer_with_the_wrong_client_certificate_is_refused_by_the_receiver(
    tiny_pair, adapter_dir, certs, other_certs
):
    sharer_side = towards_receiver(certs, other_certs)
    running = SecurePair(tiny_pair, adapter_dir, mtls(certs), sharer_side)
    try:
        code, details, _ = handoff_status(running.sharer)  # the first hop is plaintext here
        assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("receiver:")
    finally:
        running.stop()


def test_rotated_certificates_are_used_without_a_restart(
    tiny_pair, adapter_dir, tmp_path, certs, other_certs
):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server-key.pem", "ca.pem"):
        shutil.copy(certs / name, live / name)
    running = SecurePair(tiny_pair, adapter_dir, mtls(live), {})
    try:
        stub = health_pb2_grpc.HealthStub
        old, new = client_mtls(certs), client_mtls(other_certs)

        def check(security: ClientSecurity) -> grpc.StatusCode:
            channel = security.channel(running.receiver)  # a new channel: a new handshake
            try:
                stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as err:
                return err.code()
            finally:
                channel.close()
            return grpc.StatusCode.OK

        assert check(old) == grpc.StatusCode.OK and check(new) == grpc.StatusCode.UNAVAILABLE
        for name in ("server.pem", "server-key.pem", "ca.pem"):  # rotate: everything from the other CA
            shutil.copy(other_certs / name, live / name)
        assert check(new) == grpc.StatusCode.OK
        assert check(old) == grpc.StatusCode.UNAVAILABLE
        assert running.receiver_running.certificates.loads == 2
    finally:
        running.stop()


def test_the_sharers_rotated_client_certificate_is_used_without_a_restart(
    tiny_pair, adapter_dir, tmp_path, certs, other_certs
):
    """The sharer's channel to the receiver is made anew when its client certificate files
    change: after both sides move to another CA and the receiver restarts (dropping the old
    connection), handoffs go through again without restarting the sharer."""
    receiver_files, sharer_files = tmp_path / "receiver", tmp_path / "sharer"
    for directory in (receiver_files, sharer_files):
        directory.mkdir()
        for name in ("server.pem", "server-key.pem", "ca.pem", "client.pem", "client-key.pem"):
            shutil.copy(certs / name, directory / name)
    sharer_side = towards_receiver(sharer_files, sharer_files)
    running = SecurePair(tiny_pair, adapter_dir, mtls(receiver_files), sharer_side)
    try:
        assert handoff_status(running.sharer)[0] == grpc.StatusCode.OK
        for directory in (receiver_files, sharer_files):  # rotate: everything from the other CA
            for name in ("server.pem", "server-key.pem", "ca.pem", "client.pem", "client-key.pem"):
                shutil.copy(other_certs / name, directory / name)
        running.restart_receiver()  # the old connection is gone: a new handshake is needed
        code, details, _ = handoff_status(running.sharer)
        assert code == grpc.StatusCode.OK, details
        shutil.copy(certs / "client-key.pem", sharer_files / "client-key.pem")  # half-written
        assert handoff_status(running.sharer)[0] == grpc.StatusCode.OK  # the channel in use stays
        shutil.copy(other_certs / "client-key.pem", sharer_files / "client-key.pem")  # finished
        assert handoff_status(running.sharer)[0] == grpc.StatusCode.OK
        before = running.sharer_service.channel
        running.sharer_running.reload_certificates()  # SIGHUP: a new channel even if nothing changed
        assert handoff_status(running.sharer)[0] == grpc.StatusCode.OK
        assert running.sharer_service.channel is not before
    finally:
        running.stop()


def test_a_half_written_rotation_keeps_the_old_certificate(tmp_path, certs, other_certs, caplog):
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(certs / name, tmp_path / name)
    files = CertificateFiles(str(tmp_path / "server.pem"), str(tmp_path / "server-key.pem"))
    assert files.fetch() is None  # unchanged
    shutil.copy(other_certs / "server.pem", tmp_path / "server.pem")  # the new certificate, the old key
    assert files.fetch() is None and "does not belong to the certificate" in caplog.text
    shutil.copy(other_certs / "server-key.pem", tmp_path / "server-key.pem")  # now they agree
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
    files.reload()  # SIGHUP: re-read even though nothing changed
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration) and files.loads == 3


def test_a_tls_receiver_refuses_to_start_without_client_authentication(certs, tokens):
    tls = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server-key.pem")}
    with pytest.raises(ValueError, match="nothing authenticates the sharer"):
        ServiceConfig("receiver", model="tiny", **tls)
    ServiceConfig("receiver", model="tiny", allow_unauthenticated=True, **tls)
    ServiceConfig("receiver", model="tiny", auth_token_file=str(tokens / "receiver"), **tls)
    ServiceConfig("sharer", model="tiny", receiver="x:1", **tls)  # clients of a sharer may be anyone
    with pytest.raises(ValueError, match="needs both --tls-cert and --tls-key"):
        ServiceConfig("sharer", model="tiny", receiver="x:1", tls_cert=str(certs / "server.pem"))


def test_unusable_files_are_refused_at_start_with_what_is_wrong(certs, other_certs, tmp_path):
    with pytest.raises(SecurityConfigError, match="does not belong to the certificate"):
        CertificateFiles(str(certs / "server.pem"), str(other_certs / "server-key.pem"))
    with pytest.raises(SecurityConfigError, match="cannot read certificate"):
        CertificateFiles(str(tmp_path / "missing.pem"), str(certs / "server-key.pem"))
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(SecurityConfigError, match="not a PEM certificate"):
        CertificateFiles(str(tmp_path / "junk.pem"), str(certs / "server-key.pem"))
    with pytest.raises(SecurityConfigError, match="needs --tls-ca"):
        ClientSecurity(
            tls_client_cert=str(certs / "client.pem"), tls_client_key=str(certs / "client-key.pem")
        )


# --- bearer tokens -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_pair(tiny_pair, adapter_dir, tokens):
    running = SecurePair(
        tiny_pair,
        adapter_dir,
        {"auth_token_file": str(tokens / "receiver")},
        {"auth_token_file": str(tokens / "sharer"), "receiver_auth_token_file": str(tokens / "receiver")},
    )
    yield running
    running.stop()


def test_the_right_tokens_work_on_both_hops(token_pair, tokens):
    code, details, result = handoff_status(
        token_pair.sharer, ClientSecurity(auth_token_file=str(tokens / "sharer"))
    )
    assert code == grpc.StatusCode.OK, details
    assert result.summary.bytes_wire > 0  # the latents went through the receiver's check too


@pytest.mark.parametrize("token", [None, "wrong", "receiver"], ids=["missing", "wrong", "other-hops-token"])
def test_missing_or_wrong_token_is_unauthenticated(token_pair, tokens, token):
    security = ClientSecurity(auth_token_file=str(tokens / token)) if token else None
    code, details, _ = handoff_status(token_pair.sharer, security)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert ("no bearer token" if token is None else "token is wrong") in details
    # every RPC, not only Handoff
    client = HandoffClient(token_pair.sharer, timeout_s=10, security=security)
    with pytest.raises(grpc.RpcError) as err:
        client.open_session(CONTEXT)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # and the receiver: a direct Receive is refused before a message is read
    channel = (
        ClientSecurity(auth_token_file=str(tokens / token)).channel(token_pair.receiver) if token else None
    )
    receiver = pb_grpc.ReceiverStub(channel or grpc.insecure_channel(token_pair.receiver))
    request = pb.LatentMessage(request=pb.ReceiverRequest(prompt_text=PROMPT, mode=pb.NONE))
    expected = grpc.StatusCode.OK if token == "receiver" else grpc.StatusCode.UNAUTHENTICATED
    try:
        list(receiver.Receive(iter([request]), timeout=10))
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
    assert code == expected


def test_the_sharer_without_the_receivers_token_is_refused(tiny_pair, adapter_dir, tokens):
    running = SecurePair(
        tiny_pair,
        adapter_dir,
        {"auth_token_file": str(tokens / "receiver")},
        {"receiver_auth_token_file": str(tokens / "wrong")},
    )
    try:
        code, details, _ = handoff_status(running.sharer, mode="none")
        assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("receiver:")
    finally:
        running.stop()


def test_health_stays_open_without_a_token(token_pair):
    for target, service in (
        (token_pair.sharer, "lcflow.v1.Sharer"),
        (token_pair.receiver, "lcflow.v1.Receiver"),
    ):
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_a_rotated_token_file_is_picked_up(tmp_path):
    path = tmp_path / "token"
    path.write_text("first\n")
    token = TokenFile(str(path))
    assert token.value() == b"first"
    replacement = tmp_path / "token.new"
    replacement.write_text("second\n")
    replacement.replace(path)  # as a secret mount or an atomic write rotates it
    assert token.value() == b"second"
    path.write_text("")  # emptied mid-rotation: the last good token stays
    assert token.value() == b"second"
    with pytest.raises(SecurityConfigError, match="is empty"):
        TokenFile(str(path))
    with pytest.raises(SecurityConfigError, match="does not exist"):
        TokenFile(str(tmp_path / "nope"))


# --- lcflow certs make ----------------------------------------------------------------------------


def test_certs_make_writes_a_ca_and_both_certificates(tmp_path, capsys):
    from cryptography import x509

    from lcflow.cli import main

    assert main(["certs", "make", str(tmp_path / "c"), "--hosts", "receiver.internal,10.0.0.7"]) == 0
    names = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")
    for name in names:
        mode = stat.S_IMODE((tmp_path / "c" / name).stat().st_mode)
        assert mode == (0o600 if "key" in name else 0o644), (name, oct(mode))
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["receiver.internal"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    # a second run does not overwrite silently
    assert main(["certs", "make", str(tmp_path / "c")]) == 2
    assert "--force" in capsys.readouterr().err
    # an init job run again keeps what is there; with --token it also writes a token, owner-only
    before = (tmp_path / "c" / "ca.pem").read_bytes()
    assert main(["certs", "make", str(tmp_path / "c"), "--keep-existing", "--force", "--token"]) == 0
    assert (tmp_path / "c" / "ca.pem").read_bytes() != before  # the token was missing: all made anew
    token = (tmp_path / "c" / "token").read_text().strip()
    assert len(token) >= 40 and stat.S_IMODE((tmp_path / "c" / "token").stat().st_mode) == 0o600
    after = (tmp_path / "c" / "ca.pem").read_bytes()
    assert main(["certs", "make", str(tmp_path / "c"), "--keep-existing", "--token"]) == 0
    assert (tmp_path / "c" / "ca.pem").read_bytes() == after and (
        tmp_path / "c" / "token"
    ).read_text().strip() == token


def test_the_health_port_answers_in_plaintext_and_serves_nothing_else(tiny_pair, adapter_dir, certs):
    health_port = free_port()
    running = SecurePair(tiny_pair, adapter_dir, {**mtls(certs), "health_port": health_port}, {})
    try:
        plain = grpc.insecure_channel(f"127.0.0.1:{health_port}")
        reply = health_pb2_grpc.HealthStub(plain).Check(
            health_pb2.HealthCheckRequest(service="lcflow.v1.Receiver"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = pb.LatentMessage(request=pb.ReceiverRequest(prompt_text=PROMPT, mode=pb.NONE))
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.ReceiverStub(plain).Receive(iter([request]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:  # the service port itself stays TLS-only
            health_pb2_grpc.HealthStub(grpc.insecure_channel(running.receiver)).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        running.receiver_running.set_serving(False)  # one status, both ports
        reply = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.stop()


def test_the_demo_client_runs_against_mtls_services(mtls_pair, certs, capsys, monkeypatch):
    """As compose's `demo` service runs it: `lcflow demo --sharer` with the client settings in LCFLOW_*."""
    from lcflow.cli import main

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("LCFLOW_TLS_CA", str(certs / "ca.pem"))
    monkeypatch.setenv("LCFLOW_TLS_CLIENT_CERT", str(certs / "client.pem"))
    monkeypatch.setenv("LCFLOW_TLS_CLIENT_KEY", str(certs / "client-key.pem"))
    assert main(["demo", "--sharer", mtls_pair.sharer, "--n", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "NOTE:" in out and "FORWARD:" in out and "LCFX:" in out
    assert "(SELECTED is left out: " in out  # a slot adapter has no sentences to forward
    # without them the same client is refused by the TLS sharer
    monkeypatch.delenv("LCFLOW_TLS_CA")
    monkeypatch.delenv("LCFLOW_TLS_CLIENT_CERT")
    monkeypatch.delenv("LCFLOW_TLS_CLIENT_KEY")
    assert main(["demo", "--sharer", mtls_pair.sharer, "--n", "1", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcflow demo: the call failed: UNAVAILABLE") and "\n" not in err  # no traceback
