"""Server certificates for NTS-KE: load, check, and replace while serving.

Strategy: a `CertStore` owns the current pyOpenSSL Context. `check()` (called periodically and
on SIGHUP) compares the files' identity (inode, size, mtime); when they changed it builds a new
Context from them, and only if that fully succeeds (key readable only by us, chain and key match)
swaps it in. Connections already running keep the Context they started with, so a renewal by an
ACME client never fails a handshake; a half-written or broken file is ignored until it is fixed,
logged as a warning (a renewal goes through a mismatched pair for a moment), as an error if it
lasts a minute. TLS 1.3 only, ALPN "ntske/1" required.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL

from ..files import UnsafeFile, file_identity, read_private_file

log = logging.getLogger("ntsd.nts")
ALPN = b"ntske/1"
EXPIRY_WARNING_DAYS = 14
BROKEN_GRACE_S = 60.0  # changed certificate files may make no usable pair this long before it is an error


class CertError(Exception):
    """The certificate or key cannot be used; the message says why."""


class AlpnRefused(Exception):
    """The client offered ALPN values but not ntske/1. Raised from the ALPN callback so that
    OpenSSL aborts the handshake with a fatal no_application_protocol alert (RFC 7301 section 3.2);
    pyOpenSSL re-raises it from do_handshake()."""


# All three TLS 1.3 suites, SHA-256 ones first: the handshake's key schedule and the exporter are
# HMAC-heavy, and SHA-256 has hardware support on most CPUs where SHA-384 has none (a third less
# handshake CPU here). A session carries a few hundred bytes, so AES-128 vs AES-256 does not matter.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    """Choose ntske/1, and note the choice on the connection (cheaper to ask than OpenSSL)."""
    if ALPN in offered:
        conn.set_app_data(ALPN)
        return ALPN
    raise AlpnRefused


def alpn_chosen(conn: SSL.Connection) -> bool:
    """Whether the handshake agreed on ntske/1 (a client may offer no ALPN at all: then it did not)."""
    return conn.get_app_data() is ALPN


def build_context(cert_path: Path, key_path: Path) -> tuple[SSL.Context, str]:
    """A TLS 1.3-only server Context; returns it with a one-line description of the certificate."""
    ctx, subject, not_after = _load(cert_path, key_path)
    return ctx, describe(subject, not_after)


def describe(subject: str, not_after: datetime.datetime | None) -> str:
    return f"{subject}, expires {not_after:%Y-%m-%d %H:%M}Z" if not_after else subject


_KEY_MAX = 1 << 20  # a PEM private key is a few kB
TlsKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


def _read(path: Path, limit: int) -> bytes:
    """Up to `limit` bytes of `path`; what OpenSSL would report as "system lib", said plainly."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}") from None


def _private_key(key_path: Path, pem: bytes) -> TlsKey:
    """The key, read by `cryptography`, never by OpenSSL's PEM reader: given an encrypted key, that
    one asks the terminal for the passphrase, and waits (a server started, or reloading, in a
    terminal hung there)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password was given"
        raise CertError(
            f"private key {key_path} is encrypted (it has a passphrase) and a server has no one to ask for it: "
            f"store it unencrypted, mode 0600 (openssl pkey -in {key_path} -out NEW.key)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"private key {key_path} is not a PEM private key that can be used") from None
    if not isinstance(key, TlsKey):
        raise CertError(f"private key {key_path}: a {type(key).__name__} cannot sign TLS handshakes (use EC or RSA)")
    return key


def _load(cert_path: Path, key_path: Path) -> tuple[SSL.Context, str, datetime.datetime | None]:
    """The Context, and the subject and expiry of the chain's first certificate (CertError if unusable)."""
    try:
        pem = read_private_file(key_path, _KEY_MAX)
    except FileNotFoundError:
        raise CertError(f"private key {key_path} does not exist") from None
    except UnsafeFile as exc:
        raise CertError(f"private key refused: {exc}") from None
    except OSError as exc:
        raise CertError(f"cannot read {key_path}: {exc.strerror}") from None
    _read(cert_path, 0)  # OpenSSL reads it below; here only its readability, said plainly
    key = _private_key(key_path, pem)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_tls13_ciphersuites(TLS13_SUITES)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        cert: x509.Certificate | None = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (ValueError, OSError):
        cert = None  # OpenSSL says what is wrong with it below
    if cert is not None and not _same_key(cert, key):  # (OpenSSL's words for it: "no certificate assigned")
        raise CertError(f"the private key {key_path} does not belong to the certificate {cert_path} "
                        "(their public keys differ): renewed one without the other?")  # fmt: skip
    try:
        ctx.use_certificate_chain_file(str(cert_path))
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise CertError(f"cannot use {cert_path} with {key_path}: {_ssl_reason(exc)}") from None
    ctx.set_alpn_select_callback(_select_alpn)
    if cert is None:
        return ctx, str(cert_path), None
    return ctx, cert.subject.rfc4514_string(), cert.not_valid_after_utc


def _same_key(cert: x509.Certificate, key: TlsKey) -> bool:
    """Whether `key` is the private half of the certificate's public key (True when it cannot tell)."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        return bool(cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki))
    except (ValueError, UnsupportedAlgorithm):
        return True  # OpenSSL judges it below


def expiry_problem(not_after: datetime.datetime | None, now: datetime.datetime) -> tuple[int, str] | None:
    """(log level, message) when the certificate has expired or expires within EXPIRY_WARNING_DAYS."""
    if not_after is None:
        return None
    left = not_after - now
    if left <= datetime.timedelta(0):
        return logging.ERROR, f"expired on {not_after:%Y-%m-%d %H:%M}Z: NTS clients refuse it; renew it"
    if left < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        days = left.days
        when = f"in {days} day{'s' if days != 1 else ''}" if days else "within a day"
        return logging.WARNING, f"expires {when} ({not_after:%Y-%m-%d %H:%M}Z); renew it (the new file is picked up)"
    return None


def _ssl_reason(exc: SSL.Error) -> str:
    parts = [str(p[2]) for p in exc.args[0] if isinstance(p, tuple) and len(p) == 3 and p[2]] if exc.args else []
    return "; ".join(parts) or "invalid certificate or key"


class CertStore:
    """The Context new NTS-KE connections use, replaced when the files change."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self._seen = (file_identity(cert_path), file_identity(key_path))  # before reading: a change after is seen
        self.context, self.subject, self.not_after = _load(cert_path, key_path)
        self.reloads = 0
        self._expiry_logged: datetime.datetime | None = None
        self.clock: Callable[[], float] = time.monotonic
        self._broken: tuple[float, str] | None = None  # since when the changed files make no usable pair, why

    def check(self, force: bool = False) -> bool:
        """Reload if the files changed (or `force`); True when a new certificate is in use.

        Changed files that make no usable pair are logged as a warning and the previous certificate
        kept: an ACME client replaces the certificate and the key one after the other, so a check
        between the two sees a mismatch for a moment. Still so after BROKEN_GRACE_S: an error."""
        seen = (file_identity(self.cert_path), file_identity(self.key_path))
        if seen == self._seen and not force:
            self._escalate()
            return False
        try:
            context, subject, not_after = _load(self.cert_path, self.key_path)
        except (CertError, OSError) as exc:
            if seen != self._seen:
                log.warning("the certificate files changed but are not a usable pair (yet), still serving the "
                            "previous certificate: %s", exc)  # fmt: skip
                self._broken = (self.clock(), str(exc))
            self._seen = seen  # log once per change of the files
            return False
        self._broken = None
        self._seen = seen
        self.context, self.subject, self.not_after = context, subject, not_after
        self.reloads += 1
        log.info("serving NTS-KE certificate %s", self.description)
        self.report_expiry(force=True)
        return True

    def _escalate(self) -> None:
        if self._broken is not None and self.clock() - self._broken[0] >= BROKEN_GRACE_S:
            log.error("the certificate files have not made a usable pair for %.0f s, still serving the previous "
                      "certificate: %s", BROKEN_GRACE_S, self._broken[1])  # fmt: skip
            self._broken = None  # said once; the next change of the files starts afresh

    @property
    def description(self) -> str:
        return describe(self.subject, self.not_after)

    def report_expiry(self, force: bool = False, now: datetime.datetime | None = None) -> None:
        """Log an expired or soon expiring certificate: when forced (start, a new certificate), else
        at most once a day while it lasts."""
        now = now or datetime.datetime.now(datetime.UTC)
        problem = expiry_problem(self.not_after, now)
        if problem is None:
            return
        if not force and self._expiry_logged is not None and now - self._expiry_logged < datetime.timedelta(days=1):
            return
        self._expiry_logged = now
        log.log(problem[0], "NTS-KE certificate %s %s", self.subject, problem[1])
