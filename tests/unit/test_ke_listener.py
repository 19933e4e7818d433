"""The NTS-KE session's steps when the socket pushes back, with a stand-in TLS connection (the real
peers' paths are covered by the integration and interop tests; a full send buffer is not something
a loopback test can bring about on demand)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from nts.core.policy import AccessPolicy, Shared
from nts.core.stats import Counters
from nts.nts import ke_listener as listener
from nts.nts.certs import ALPN, CertStore
from nts.nts.cookies import KeyRing
from nts.nts.devcerts import make_dev_certs
from nts.nts.ke_listener import KeServer, KeSession, KeSettings
from nts.wire.ke_records import RecordReader, RecordType
from tests.nts_helpers import AEAD15, NP, request


class StandInTls:
    """Plays the client's side as OpenSSL would report it: the handshake completes, the request
    arrives, and the first `full` attempts to send the response find the socket's buffer full."""

    def __init__(self, full: int) -> None:
        self.full = full
        self.sent: list[bytes] = []
        self.shut = False

    def set_accept_state(self) -> None:
        pass

    def do_handshake(self) -> None:
        pass

    def get_app_data(self) -> bytes:  # where the ALPN callback notes ntske/1
        return ALPN

    def recv(self, size: int) -> bytes:
        return request(NP, AEAD15)

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        return bytes(length)

    def send(self, data: bytes) -> int:
        if self.full:
            self.full -= 1
            raise SSL.WantWriteError()
        self.sent.append(data)
        return len(data)

    def shutdown(self) -> bool:
        self.shut = True
        return False


@pytest.fixture
def server(tmp_path: Path) -> KeServer:
    certs = make_dev_certs(tmp_path, ["localhost"])
    return KeServer(CertStore(certs.certificate, certs.private_key), KeyRing(os.urandom(32)),
                    KeSettings(supported_aeads=(15,)), Counters())  # fmt: skip


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # only its selector is used: sessions register their sockets
    yield loop
    loop.close()


def session_with(
    monkeypatch: pytest.MonkeyPatch,
    server: KeServer,
    sock: socket.socket,
    tls: StandInTls,
    loop: asyncio.AbstractEventLoop,
) -> KeSession:
    def connection(context: Any, s: Any) -> StandInTls:
        return tls

    monkeypatch.setattr(SSL, "Connection", connection)
    return KeSession(server, sock, "127.0.0.1", loop)


def test_a_full_send_buffer_waits_for_writable_then_sends_the_same_response(
    monkeypatch: pytest.MonkeyPatch,
    server: KeServer,
    pair: tuple[socket.socket, socket.socket],
    loop: asyncio.AbstractEventLoop,
) -> None:
    tls = StandInTls(full=2)
    session = session_with(monkeypatch, server, pair[0], tls, loop)
    session.step()
    assert not session.closed and session.writing
    assert loop.remove_reader(session.fd) is False  # waits for writable only
    pending = session.pending
    session.step()  # still full: keeps waiting, the response unchanged
    assert not session.closed and session.pending == pending and not tls.sent
    session.step()
    assert session.closed and tls.shut and tls.sent == [pending]
    records = RecordReader(65536).feed(tls.sent[0])
    assert [r.type for r in records].count(RecordType.NEW_COOKIE) == 8
    assert server.stats.counts[("nts_ke_sessions", "ok", "AES-SIV-CMAC-256")] == 1
    assert pair[0].fileno() == -1  # closed, and the loop no longer watches it
    assert loop.remove_writer(session.fd) is False and loop.remove_reader(session.fd) is False


def test_a_session_answers_at_once_when_the_socket_takes_it(
    monkeypatch: pytest.MonkeyPatch,
    server: KeServer,
    pair: tuple[socket.socket, socket.socket],
    loop: asyncio.AbstractEventLoop,
) -> None:
    tls = StandInTls(full=0)
    session = session_with(monkeypatch, server, pair[0], tls, loop)
    session.step()
    assert session.closed and len(tls.sent) == 1 and tls.shut


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="the epoll set is Linux's (elsewhere: the loop, above)")
def test_sessions_in_the_epoll_set_are_stepped_when_their_socket_is_ready(
    monkeypatch: pytest.MonkeyPatch,
    server: KeServer,
    pair: tuple[socket.socket, socket.socket],
    loop: asyncio.AbstractEventLoop,
) -> None:
    poller = server.poller = select.epoll()  # as start() makes it on Linux
    try:
        tls = StandInTls(full=2)
        session = session_with(monkeypatch, server, pair[0], tls, loop)
        server.adopt(session)
        assert poller.poll(0) == []  # watched for readable only, and nothing has come (always writable)
        assert loop.remove_reader(session.fd) is False  # not by the loop
        pair[1].send(b"client hello")
        server.step_ready()  # stepped: the send buffer is full, so now watched for writable only
        assert session.writing and poller.poll(0) == [(session.fd, select.EPOLLOUT)]
        server.step_ready()
        assert not session.closed and not tls.sent
        server.step_ready()
        assert session.closed and tls.sent and tls.shut and session not in server.sessions
        assert pair[0].fileno() == -1 and poller.poll(0) == []  # closed: out of the set too
    finally:
        poller.close()


class ExhaustedListener:
    """A listening socket's stand-in whose accept() fails as when the process has no descriptors left;
    `tried` is set at each call."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0
        self.tried = asyncio.Event()

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *option: object) -> None:
        pass

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        self.tried.set()
        raise OSError(errno.EMFILE, "Too many open files")


def test_accept_out_of_descriptors_pauses_the_listener_then_resumes(
    monkeypatch: pytest.MonkeyPatch, server: KeServer, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A listening socket stays readable while accept() fails: without the pause the loop would spin."""
    monkeypatch.setattr(listener, "_ACCEPT_RETRY_S", 0.05)
    pair[1].send(b"x")  # readable, as a listener with connections waiting is

    async def run() -> None:
        exhausted = ExhaustedListener(pair[0])
        loop = asyncio.get_running_loop()
        await server.start([exhausted])  # type: ignore[list-item]
        await asyncio.wait_for(exhausted.tried.wait(), 5)
        assert exhausted.calls == 1
        assert loop.remove_reader(exhausted.fileno()) is False  # paused: the loop does not watch it
        exhausted.tried.clear()
        await asyncio.wait_for(exhausted.tried.wait(), 5)  # the pause is over: accepting again
        await server.stop()
        assert server.stats.counts[("nts_ke_accept_errors", "EMFILE")] == exhausted.calls == 2

    asyncio.run(run())


def test_the_access_lists_refuse_before_any_tls_work(server: KeServer) -> None:
    """A server kept to its networks does no handshake for anyone else (chrony checks its access
    restrictions when it accepts an NTS-KE connection)."""
    assert server.admit("192.0.2.1") is None  # open by default
    server.share(Shared(AccessPolicy(
        allow=[ipaddress.ip_network("192.0.2.0/24")], deny=[ipaddress.ip_network("192.0.2.9/32")]
    )))  # fmt: skip
    assert server.admit("192.0.2.1") is None
    assert server.admit("192.0.2.9") == "refused_access"  # denied
    assert server.admit("198.51.100.1") == "refused_access"  # outside the allow list
    assert server.admit("2001:db8::1") == "refused_access"


def test_with_workers_each_takes_its_share_of_the_limits(server: KeServer) -> None:
    """Connections go to whichever worker accepts first, so each worker's own per-address rate and
    connection limit let a client have workers times the configured ones; now each takes its share."""
    server.configure(KeSettings(supported_aeads=(15,), rate=0.001, burst=16))
    assert [server.admit("192.0.2.1") for _ in range(17)] == [None] * 16 + ["refused_rate"]
    server.share(Shared(AccessPolicy(), workers=4))
    assert [server.admit("192.0.2.2") for _ in range(5)] == [None] * 4 + ["refused_rate"]


@pytest.mark.parametrize(
    ("sent", "whole"),
    [
        (bytes([22, 3, 1, 0, 4]) + b"abcd", True),  # a whole handshake record
        (bytes([22, 3, 1, 0, 4]) + b"abc", False),  # its last byte still to come
        (bytes([22, 3, 1]), False),  # not even a header yet
        (b"GET / HTTP/1.1\r\n", True),  # not TLS: the session fails it at once
        (b"PROXY TCP4 ", False),  # a PROXY header, from a peer not named in nts.proxy_protocol
        (b"\r\n\r\n\x00\r\nQUIT\n\x21", False),
        (bytes([22, 3, 1, 0xFF, 0xFF]) + bytes(5000), True),  # more than is peeked: enough to judge
    ],
)
def test_a_connection_is_ready_for_a_session_when_its_first_record_is_whole(sent: bytes, whole: bool) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(sent)
        assert (listener._first_record(b) == "whole") is whole
        assert b.recv(len(sent) + 1) == sent  # only peeked: the session reads it all


def test_a_connection_closed_by_its_peer_is_ready_too() -> None:
    a, b = socket.socketpair()
    with b:
        a.close()
        assert listener._first_record(b) == "whole"  # (the session sees the end and counts it)
