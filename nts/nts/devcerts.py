"""`ntsd certs`: a development CA and a server certificate for the given names and addresses.

Strategy: plain `cryptography` X.509 building; keys written with mode 0600 and atomically. The CA
is for development only (it signs whatever the developer asks); production certificates come
from a real CA (ACME), which the server picks up without a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..files import write_private_file
from ..net import is_dns_name

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class DevCerts:
    ca: Path
    certificate: Path
    private_key: Path


def _key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def subject_alt_name(name: str) -> x509.GeneralName:
    """An IP address, or a DNS name (internationalised names as their ASCII form; a leading "*."
    for a wildcard); anything else raises ValueError saying why."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"{name!r} is neither an IP address nor a usable DNS name") from None
    if not is_dns_name(ascii_name.removeprefix("*.")):
        raise ValueError(f"{name!r} is neither an IP address nor a usable DNS name")
    return x509.DNSName(ascii_name)


def make_dev_certs(out: Path, names: list[str], days: int = 90, kind: str = "ec") -> DevCerts:
    """Write ca.pem, ca.key, server.pem and server.key into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = _key(kind)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ntsd development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    alt = [subject_alt_name(name) for name in names]
    server_key = _key(kind)
    common_name = names[0] if len(names[0]) <= 64 else "ntsd development server"  # X.509 caps CN at 64
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = DevCerts(out / "ca.pem", out / "server.pem", out / "server.key")
    write_private_file(out / "ca.key", _pem_key(ca_key))
    write_private_file(paths.private_key, _pem_key(server_key))
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    return paths
