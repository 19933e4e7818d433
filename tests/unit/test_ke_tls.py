"""The NTS-KE server's TLS context: suite preference, in memory (no sockets)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from OpenSSL import SSL

from nts.ke.certs import CertError, CertStore, build_context, expiry_problem
from nts.ke.devcerts import make_dev_certs


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
