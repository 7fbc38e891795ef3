"""`lcflow certs make DIR`: a private CA and a server and a client certificate, for local use.

    lcflow certs make certs --hosts localhost,127.0.0.1,sharer,receiver

writes DIR/ca.pem, server.pem, server-key.pem, client.pem, client-key.pem (keys readable by
their owner only). One server certificate serves both services (its names are --hosts), one
client certificate serves both the sharer (towards the receiver) and `lcflow handoff`:

    lcflow serve receiver ... --tls-cert certs/server.pem --tls-key certs/server-key.pem --tls-client-ca certs/ca.pem
    lcflow serve sharer ... --tls-cert certs/server.pem --tls-key certs/server-key.pem \\
        --receiver-tls-ca certs/ca.pem --receiver-tls-client-cert certs/client.pem \\
        --receiver-tls-client-key certs/client-key.pem
    lcflow handoff ... --tls-ca certs/ca.pem

`--token` also writes DIR/token, a random bearer token for --auth-token-file.

Written with the `cryptography` package (ECDSA P-256, SHA-256), never by shelling out to
openssl. The CA's key stays in DIR/ca-key.pem so more certificates can be signed later; keep
it out of images and deployments (only ca.pem is needed there).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from lcflow.core.errors import UsageError

DEFAULT_HOSTS = "localhost,127.0.0.1,::1"
FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "certs",
        help="make a private CA and server/client certificates for TLS and mutual TLS",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    make = actions.add_parser(
        "make", help="write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem"
    )
    make.add_argument("dir", type=Path, help="directory to write into (created if missing)")
    make.add_argument(
        "--hosts",
        default=DEFAULT_HOSTS,
        help="comma-separated DNS names and IP addresses the server certificate is valid for "
        "(default %(default)s)",
    )
    make.add_argument("--days", type=int, default=365, help="validity of the certificates, in days")
    make.add_argument("--force", action="store_true", help="overwrite certificates already in DIR")
    make.add_argument(
        "--keep-existing",
        action="store_true",
        help="do nothing when DIR already holds every file (a one-shot init job run again)",
    )
    make.add_argument(
        "--token", action="store_true", help="also write DIR/token, a random bearer token (--auth-token-file)"
    )
    make.set_defaults(func=run_make)


def run_make(args) -> int:
    wanted = [*FILES, *(["token"] if args.token else [])]
    if args.keep_existing and all((args.dir / name).is_file() for name in wanted):
        print(f"{args.dir} already holds {', '.join(wanted)}; kept")
        return 0
    written = make_certs(args.dir, parse_hosts(args.hosts), days=args.days, force=args.force)
    if args.token:
        written.append(make_token(args.dir))
    for path in written:
        print(path)
    return 0


def make_token(directory: Path) -> Path:
    """DIR/token: 256 random bits, URL-safe, owner-only, for --auth-token-file on both sides."""
    import secrets

    path = Path(directory) / "token"
    _write(path, (secrets.token_urlsafe(32) + "\n").encode(), private=True)
    return path


def parse_hosts(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise UsageError("--hosts is empty: name at least one DNS name or IP address")
    return hosts


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lcflow"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool) -> None:
    # Keys are created owner-only from the start, not chmod-ed after being world-readable
    # (removed first: an existing file would keep its old mode).
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certs(directory: Path, hosts: list[str], days: int = 365, force: bool = False) -> list[Path]:
    """Write a CA, a server certificate for `hosts` and a client certificate into `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    directory = Path(directory)
    if days < 1:
        raise UsageError(f"--days must be at least 1, not {days}")
    existing = [name for name in FILES if (directory / name).exists()]
    if existing and not force:
        raise UsageError(f"{directory} already holds {', '.join(existing)}; pass --force to replace them")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def builder(subject, issuer, public_key):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("lcflow local CA")
    ca = (
        builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA256())
    )
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def leaf(common_name: str, usage, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(_name(common_name), ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )  # digital_signature
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(authority, critical=False)
        )
        if san is not None:
            cert = cert.add_extension(san, critical=False)
        return key, cert.sign(ca_key, hashes.SHA256())

    server_key, server = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, _san(hosts))
    client_key, client = leaf("lcflow-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    outputs = {
        "ca.pem": (ca.public_bytes(pem), False),
        "ca-key.pem": (key_pem(ca_key), True),
        "server.pem": (server.public_bytes(pem), False),
        "server-key.pem": (key_pem(server_key), True),
        "client.pem": (client.public_bytes(pem), False),
        "client-key.pem": (key_pem(client_key), True),
    }
    for name, (data, private) in outputs.items():
        _write(directory / name, data, private)
    return [directory / name for name in outputs]
