"""The NTS-KE server's TLS context: suite preference, in memory (no sockets)."""

from __future__ import annotations

import datetime
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from nts.nts.certs import BROKEN_GRACE_S, CertError, CertStore, build_context, expiry_problem
from nts.nts.devcerts import make_dev_certs


def _handshake(server_ctx: SSL.Context, client_suites: bytes | None) -> str:
    """Run a TLS 1.3 handshake between `server_ctx` and a client over memory BIOs; the suite chosen."""
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_alpn_protos([b"ntske/1"])
    if client_suites is not None:
        client_ctx.set_tls13_ciphersuites(client_suites)
    server, client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server.set_accept_state()
    client.set_connect_state()
    done = [False, False]
    for _ in range(10):
        for i, (this, other) in enumerate(((client, server), (server, client))):
            try:
                this.do_handshake()
                done[i] = True
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(this.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done):
            name = server.get_cipher_name()
            assert name is not None and name == client.get_cipher_name()
            return name
    raise AssertionError("handshake did not complete")


@pytest.fixture(scope="module")
def server_ctx(tmp_path_factory: pytest.TempPathFactory) -> SSL.Context:
    certs = make_dev_certs(Path(tmp_path_factory.mktemp("certs")), ["localhost"])
    return build_context(certs.certificate, certs.private_key)[0]


def test_server_prefers_a_sha256_suite(server_ctx: SSL.Context) -> None:
    """OpenSSL clients list AES-256-GCM-SHA384 first; the server's order wins (SHA-256's key
    schedule is cheaper where the CPU has SHA extensions)."""
    assert _handshake(server_ctx, None) == "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize("suite", ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_every_tls13_suite_is_still_accepted(server_ctx: SSL.Context, suite: str) -> None:
    assert _handshake(server_ctx, suite.encode()) == suite


def test_unreadable_certificate_files_are_named_plainly(tmp_path: Path) -> None:
    """OpenSSL reports an unreadable file as 'system lib'; the operator gets the file and the reason.
    (Seen after a privilege drop: the files were root's, the reload ran as the service user.)"""
    certs = make_dev_certs(tmp_path / "c", ["localhost"])
    with pytest.raises(CertError, match=f"^cannot read {tmp_path}: Is a directory$"):
        build_context(tmp_path, certs.private_key)
    (tmp_path / "gone.pem").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CertError, match=r"^cannot read .*gone\.pem: No such file or directory$"):
        build_context(tmp_path / "gone.pem", certs.private_key)
    _, description = build_context(certs.certificate, certs.private_key)
    assert description.startswith("CN=localhost")


def _encrypted(key_file: Path, fmt: serialization.PrivateFormat, prefix: bytes = b"") -> Path:
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    out = key_file.with_name(f"enc-{'pkcs8' if fmt == serialization.PrivateFormat.PKCS8 else 'traditional'}.key")
    out.write_bytes(prefix + key.private_bytes(Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"pw")))
    out.chmod(0o600)
    return out


def test_an_encrypted_key_is_refused_plainly(tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path / "c", ["localhost"])
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        key = _encrypted(certs.private_key, fmt)
        with pytest.raises(CertError) as exc:
            build_context(certs.certificate, key)
        assert str(exc.value) == (
            f"private key {key} is encrypted (it has a passphrase) and a server has no one to ask for it: "
            f"store it unencrypted, mode 0600 (openssl pkey -in {key} -out NEW.key)"
        )


def test_keys_that_are_not_usable_are_refused_plainly(tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path / "c", ["localhost"])
    for name, data in (("half.key", certs.private_key.read_bytes()[:60]), ("x448.key", _x448_pem())):
        key = tmp_path / name
        key.write_bytes(data)
        key.chmod(0o600)
        with pytest.raises(CertError, match=f"^private key {key}"):
            build_context(certs.certificate, key)


def _x448_pem() -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x448 import X448PrivateKey

    return X448PrivateKey.generate().private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_openssl_never_asks_a_terminal_for_a_passphrase(tmp_path: Path) -> None:
    """Given an encrypted key and a terminal, OpenSSL's PEM reader prompted on the terminal and waited:
    a server starting (or reloading) in a terminal hung there. The key is read by `cryptography` now;
    run with a pseudo-terminal, the load must end with the refusal (text before the PEM block too)."""
    script = shutil.which("script")  # util-linux: runs a command with a pseudo-terminal
    assert script is not None
    certs = make_dev_certs(tmp_path / "c", ["localhost"])
    key = _encrypted(certs.private_key, serialization.PrivateFormat.PKCS8, b"#" * 8000 + b"\n")
    code = (
        "import sys; from pathlib import Path; from nts.nts.certs import CertError, build_context\n"
        f"try: build_context(Path({str(certs.certificate)!r}), Path({str(key)!r}))\n"
        "except CertError as e: print('refused:', e)\n"
    )
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    out = subprocess.run(
        [script, "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    ).stdout
    assert f"refused: private key {key} is encrypted" in out and "pass phrase" not in out.lower()


def test_expiry_is_reported_two_weeks_ahead_and_when_past() -> None:
    now = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
    day = datetime.timedelta(days=1)
    assert expiry_problem(None, now) is None
    assert expiry_problem(now + 30 * day, now) is None
    assert expiry_problem(now + 14 * day, now) is None
    assert expiry_problem(now + 14 * day - datetime.timedelta(seconds=1), now) == (
        logging.WARNING,
        "expires in 13 days (2026-12-06 11:59Z); renew it (the new file is picked up)",
    )
    assert expiry_problem(now + day + datetime.timedelta(hours=1), now) == (
        logging.WARNING,
        "expires in 1 day (2026-11-23 13:00Z); renew it (the new file is picked up)",
    )
    assert expiry_problem(now + datetime.timedelta(hours=5), now) == (
        logging.WARNING,
        "expires within a day (2026-11-22 17:00Z); renew it (the new file is picked up)",
    )
    assert expiry_problem(now, now) == (logging.ERROR, "expired on 2026-11-22 12:00Z: NTS clients refuse it; renew it")


def test_expiry_is_logged_once_a_day_unless_the_certificate_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = make_dev_certs(tmp_path, ["localhost"], days=10)
    store = CertStore(certs.certificate, certs.private_key)
    assert store.not_after is not None and store.subject == "CN=localhost"
    now = datetime.datetime.now(datetime.UTC)
    with caplog.at_level(logging.WARNING, logger="ntsd.nts"):
        store.report_expiry(now=now)
        store.report_expiry(now=now + datetime.timedelta(hours=23))  # said already today
        store.report_expiry(now=now + datetime.timedelta(hours=25))
        store.report_expiry(force=True, now=now + datetime.timedelta(hours=26))  # a new certificate: at once
        store.report_expiry(now=now + datetime.timedelta(days=11))  # expired meanwhile: an error
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == [logging.WARNING] * 3 + [logging.ERROR]
    assert messages[0][1].startswith("NTS-KE certificate CN=localhost expires in 9 days")
    assert "expired on" in messages[3][1]


def test_a_renewal_halfway_is_a_warning_and_a_pair_that_stays_broken_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACME client replaces the key and the certificate one after the other; a check in between sees
    a mismatched pair. That was logged as an error on every renewal (alerts for nothing); now it is a
    warning, and an error only when the files stay unusable for BROKEN_GRACE_S."""
    old, new = make_dev_certs(tmp_path / "old", ["localhost"]), make_dev_certs(tmp_path / "new", ["localhost"])
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "fullchain.pem", live / "privkey.pem"

    def put(src: Path, dst: Path) -> None:  # replaced by rename, as ACME clients do
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(src.read_bytes())
        tmp.chmod(0o600)
        tmp.replace(dst)

    put(old.certificate, cert)
    put(old.private_key, key)
    store = CertStore(cert, key)
    now = [1000.0]
    store.clock = lambda: now[0]
    with caplog.at_level(logging.INFO, logger="ntsd.nts"):
        put(new.private_key, key)  # halfway
        assert not store.check()
        now[0] += BROKEN_GRACE_S - 1
        assert not store.check()
        put(new.certificate, cert)  # whole again, within the grace
        assert store.check()
        put(old.private_key, key)  # a pair that stays broken
        assert not store.check()
        now[0] += BROKEN_GRACE_S
        for _ in range(3):
            assert not store.check()
    levels = [r.levelno for r in caplog.records if r.levelno >= logging.WARNING]
    assert levels == [logging.WARNING, logging.WARNING, logging.ERROR]  # the error said once
    assert "not a usable pair (yet)" in caplog.records[0].getMessage()
    assert f"have not made a usable pair for {BROKEN_GRACE_S:.0f} s" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("kinds", [("ec", "ec"), ("ec", "rsa"), ("rsa", "ec")])
def test_a_key_that_does_not_match_its_certificate_is_said_so(tmp_path: Path, kinds: tuple[str, str]) -> None:
    """OpenSSL's words were `no certificate assigned` (an EC certificate with an RSA key, say)."""
    from nts.nts.certs import CertError, CertStore

    cert = make_dev_certs(tmp_path / "a", ["localhost"], kind=kinds[0]).certificate
    key = make_dev_certs(tmp_path / "b", ["localhost"], kind=kinds[1]).private_key
    with pytest.raises(CertError) as exc:
        CertStore(cert, key)
    assert str(exc.value) == (
        f"the private key {key} does not belong to the certificate {cert} (their public keys differ): "
        "renewed one without the other?"
    )
