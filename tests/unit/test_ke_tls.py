"""The NTS-KE server's TLS context: suite preference, in memory (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL

from nts.ke.certs import CertError, build_context
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
