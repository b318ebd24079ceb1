"""TLS for the development stack and the tests: a development CA and the certificates it
signs (`make run TLS=1` keeps them under .data/tls/; tests make throwaway ones), and where
each file goes: the server's TLS_* settings, Envoy, gRPC channels, grpcurl and curl."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The server's settings that turn TLS on (server/settings.py).
SERVER_TLS_SETTINGS = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")
# What the server certificate names: every address a local caller dials.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
CERTIFICATE_DAYS = 365
# A kept certificate this close to expiry is made anew rather than reused.
_RENEW_BEFORE = datetime.timedelta(days=7)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA, the server's certificate and key (the gRPC port and Envoy's
    listener), and a client's (Envoy towards the server, grpcurl, tests)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> TlsFiles:
        return cls(
            ca_cert=directory / "ca.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server-key.pem",
            client_cert=directory / "client.pem",
            client_key=directory / "client-key.pem",
        )

    def server_env(self, *, require_client_certificates: bool = True) -> dict[str, str]:
        """The server's settings: TLS, and with `require_client_certificates` mutual TLS
        (a caller must present a certificate this CA signed)."""
        env = {"TLS_CERT_FILE": str(self.server_cert), "TLS_KEY_FILE": str(self.server_key)}
        if require_client_certificates:
            env["TLS_CLIENT_CA_FILE"] = str(self.ca_cert)
        return env

    def channel_credentials(self, *, client_certificate: bool = True) -> grpc.ChannelCredentials:
        """Trusts this CA and, with `client_certificate`, presents the client's certificate."""
        if not client_certificate:
            return grpc.ssl_channel_credentials(root_certificates=self.ca_cert.read_bytes())
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes(),
            private_key=self.client_key.read_bytes(),
            certificate_chain=self.client_cert.read_bytes(),
        )

    def grpcurl_flags(self) -> list[str]:
        return [
            "-cacert",
            str(self.ca_cert),
            "-cert",
            str(self.client_cert),
            "-key",
            str(self.client_key),
        ]


def make_development_tls(directory: Path, *, hosts: Sequence[str] = LOCAL_HOSTS) -> TlsFiles:
    """A new CA in `directory`, and a server certificate for `hosts` and a client
    certificate, both signed by it. Keys are P-256, readable by their owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.in_directory(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Marketplace development CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _issue(
        ca_cert,
        ca_key,
        "marketplace server",
        ExtendedKeyUsageOID.SERVER_AUTH,
        files.server_cert,
        files.server_key,
        hosts=hosts,
    )
    _issue(
        ca_cert,
        ca_key,
        "marketplace development client",
        ExtendedKeyUsageOID.CLIENT_AUTH,
        files.client_cert,
        files.client_key,
    )
    return files


def ensure_development_tls(directory: Path) -> TlsFiles:
    """`make run TLS=1`'s files: those kept in `directory` while they all exist and the
    server's certificate has a week left; otherwise a new CA and certificates. The CA's key
    is never written down, so no certificate but these can ever chain to it."""
    files = TlsFiles.in_directory(directory)
    if all(path.exists() for path in dataclasses.astuple(files)):
        expires = x509.load_pem_x509_certificate(files.server_cert.read_bytes()).not_valid_after_utc
        if expires - datetime.datetime.now(datetime.UTC) > _RENEW_BEFORE:
            return files
    return make_development_tls(directory)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour back, so a clock slightly behind ours still accepts it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
    )


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    cert_path: Path,
    key_path: Path,
    *,
    hosts: Sequence[str] = (),
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
