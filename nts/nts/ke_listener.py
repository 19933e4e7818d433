"""The NTS-KE listener: TLS 1.3 over TCP on the event loop, pyOpenSSL on non-blocking sockets.

Strategy: each session's socket is non-blocking and wrapped in an `SSL.Connection` that reads and
writes it directly; the event loop calls the session back when its socket is readable (or, when the
send buffer was full, writable), and a step that would block raises WantRead/WantWrite and waits for
the next call, so a slow or silent peer never stalls the others or the loop. Measured here,
asyncio's transports with memory BIOs in between cost a fifth of a session's CPU more (the handshake
itself, OpenSSL's, is the largest part). On Linux the sessions' sockets are in one epoll set of
their own, which the loop watches as a single reader: registering each socket with the loop and
being called back through it cost more than the set's system calls (2% of a session's instructions,
3-6% of the sessions per second). Limits, each refused fast and counted: the server's access lists
(before any TLS work), concurrent connections, a per-address rate, a deadline for the whole session
(swept several times a second, oldest first), and the request size (enforced by the sans-IO
session). What to answer is the sans-IO session's (`ke_session`): this module feeds it the decrypted
bytes, sends what it returns, counts its outcome, sends close_notify and closes (RFC 8915 section
4).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import time
from collections.abc import Callable

from OpenSSL import SSL

from ..core.policy import ALLOW, RATE_OK, AccessPolicy, RateLimiter, RateSettings, Shared
from ..core.stats import Counters
from ..logutil import RateLimitedLog
from ..wire.errors import ParseError
from .aead import AEADS, AeadId
from .certs import AlpnRefused, CertStore, alpn_chosen
from .cookies import KeyRing
from .ke_session import DecidedRequests, KeServerSession, KeSettings

log = logging.getLogger("ntsd.nts")


_SWEEP_S = 0.1  # how often session deadlines are checked
_ACCEPTS = 64  # connections accepted per readiness event, so sessions under way keep their turn
_ACCEPT_RETRY_S = 1.0  # the pause after accept() failed for want of descriptors or memory


class KeServer:
    """Accepts NTS-KE sessions on any number of listening sockets."""

    def __init__(self, certs: CertStore, keyring: KeyRing, settings: KeSettings, stats: Counters) -> None:
        self.certs = certs
        self.keyring = keyring
        self.settings = settings
        self.stats = stats
        self.shared = Shared(AccessPolicy())  # the server's access lists and workers (set by the plugin)
        self._limiter = self._new_limiter(settings)
        self._events = RateLimitedLog(log)
        self._alarms = RateLimitedLog(log, level=logging.WARNING)
        self.wall_clock: Callable[[], float] = time.time
        self._listeners: list[socket.socket] = []
        self._sessions: dict[int, KeSession] = {}  # by socket fd, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.poller: select.epoll | None = None  # the sessions' sockets (Linux, once started), as one reader
        self.decided = DecidedRequests()  # whole requests seen before, shared by this server's sessions

    @property
    def active(self) -> int:
        return len(self._sessions)

    @property
    def sessions(self) -> tuple[KeSession, ...]:
        """The sessions under way, oldest first."""
        return tuple(self._sessions.values())

    def configure(self, settings: KeSettings) -> None:
        if (settings.rate, settings.burst) != (self.settings.rate, self.settings.burst):
            self._limiter = self._new_limiter(settings)
        self.settings = settings

    def share(self, shared: Shared) -> None:
        """Obey the server's access lists; with workers, enforce this worker's share of the limits
        (connections go to whichever worker accepts first, so each takes its part)."""
        workers_changed = shared.workers != self.shared.workers
        self.shared = shared
        if workers_changed:
            self._limiter = self._new_limiter(self.settings)

    def _new_limiter(self, settings: KeSettings) -> RateLimiter:
        shared = self.shared
        return RateLimiter(
            RateSettings(rate=shared.share(settings.rate), burst=shared.count(settings.burst), kod=False)
        )

    async def start(self, sockets: list[socket.socket]) -> None:
        self._loop = asyncio.get_running_loop()
        if hasattr(select, "epoll"):
            self.poller = select.epoll()
            self._loop.add_reader(self.poller.fileno(), self.step_ready)
        for sock in sockets:
            self.listen(sock)
        self._sweeper = self._loop.call_later(_SWEEP_S, self._sweep)

    def listen(self, sock: socket.socket) -> None:
        """Accept sessions on one more listening socket (after start)."""
        assert self._loop is not None
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept, sock, self._loop)
        self._listeners.append(sock)

    def unlisten(self, sock: socket.socket) -> None:
        """Stop accepting on `sock` and close it; sessions it accepted go on to their end."""
        if sock in self._listeners:
            self._listeners.remove(sock)
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())  # (not registered while paused: no matter)
        sock.close()

    async def stop(self) -> None:
        """Stop accepting and end the sessions under way."""
        if self._loop is not None:
            for sock in self._listeners:
                self._loop.remove_reader(sock.fileno())
        self._listeners.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for session in list(self._sessions.values()):
            session.close()
        if self.poller is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.poller.fileno())
            self.poller.close()
            self.poller = None

    def step_ready(self) -> None:
        """Step every session whose socket is ready (the loop saw the epoll set readable)."""
        assert self.poller is not None
        sessions = self._sessions
        for fd, _ in self.poller.poll(0):
            session = sessions.get(fd)
            if session is not None:
                session.step()

    def _accept(self, listener: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(_ACCEPTS):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the peer gave up before we took it
                continue
            except OSError as exc:  # out of descriptors or memory: pause, as the socket stays readable
                what = errno.errorcode.get(exc.errno or 0, "error")
                self.count(f"accept_{what}")
                self._alarms(
                    what, "NTS-KE accept failed (%s); accepting again in %.0f s", exc.strerror, _ACCEPT_RETRY_S
                )
                loop.remove_reader(listener.fileno())
                loop.call_later(_ACCEPT_RETRY_S, self._resume, listener, loop)
                return
            peer = addr[0] if addr else "?"
            refusal = self.admit(peer)
            if refusal is not None:
                self.count(refusal, peer)
                sock.close()
                continue
            self.count("connections")
            try:
                sock.setblocking(False)
                session = KeSession(self, sock, peer, loop)
            except Exception:  # a bug must cost this connection only, and say so
                self.count("internal_error")
                log.exception("internal error setting up an NTS-KE session with %s (closed)", peer)
                sock.close()
                continue
            self.adopt(session)

    def adopt(self, session: KeSession) -> None:
        """Serve `session` (accepted here, or built by a test around a socket pair)."""
        self._sessions[session.fd] = session

    def _resume(self, listener: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        if listener in self._listeners:  # not stopped meanwhile
            loop.add_reader(listener.fileno(), self._accept, listener, loop)

    def _sweep(self) -> None:
        """Close the sessions past their deadline (the dict is in order of arrival)."""
        assert self._loop is not None
        self._sweeper = self._loop.call_later(_SWEEP_S, self._sweep)
        deadline = time.monotonic() - self.settings.session_timeout
        expired = []
        for session in self._sessions.values():
            if session.started > deadline:
                break
            expired.append(session)
        for session in expired:
            session.end("timeout", session.peer)
            session.close()

    def forget(self, fd: int) -> None:
        self._sessions.pop(fd, None)

    def count(self, what: str, peer: str | None = None) -> None:
        """Count an event in the family it belongs to (`metric_key`); log refusals and failures."""
        self.stats.inc(metric_key(what))
        if peer is not None:  # a refusal or failure worth a (rate-limited) log line
            self._events(what, "NTS-KE session from %s: %s", peer, what)

    def admit(self, ip: str) -> str | None:
        """None to accept a new connection, else the reason to refuse it. The access lists come
        first, before any TLS work: a server kept to its networks signs handshakes for no one else."""
        if self.shared.access.check(ip) != ALLOW:
            return "refused_access"
        if self.active >= self.shared.count(self.settings.max_connections):
            return "refused_busy"
        if self._limiter.check(ip, time.monotonic_ns()) != RATE_OK:
            return "refused_rate"
        return None


ADMISSION_REFUSALS = ("refused_access", "refused_busy", "refused_rate")


def metric_key(what: str) -> tuple[str, ...]:
    """An NTS-KE event as a counter key, in families whose sums mean something: accepted
    connections; each session's one outcome, with the AEAD it agreed as a label of its own (so
    connections = the sessions' outcomes + those still open); connections refused before TLS; and
    failed accept() calls."""
    if what == "connections":
        return ("nts_ke_connections",)
    if what in ADMISSION_REFUSALS:
        return ("nts_ke_refused", what.removeprefix("refused_"))
    if what.startswith("accept_"):
        return ("nts_ke_accept_errors", what.removeprefix("accept_"))
    if what.startswith("ok_aead_"):
        number = int(what.removeprefix("ok_aead_"))
        return ("nts_ke_sessions", "ok", AeadId(number).name.replace("_", "-") if number in AEADS else str(number))
    return ("nts_ke_sessions", what, "")


class KeSession:
    """One NTS-KE session on a non-blocking socket: handshake, request, response, close.

    `step()` runs whenever the socket is ready (told by the server's epoll set, or by the loop where
    there is none) and goes as far as the peer's data allows; OpenSSL reads and writes the socket
    itself. A step that needs the socket writable (a full send buffer) is called back when it is,
    instead of when it is readable.
    """

    __slots__ = ("closed", "fd", "handshaken", "loop", "outcome", "peer", "pending", "server", "session", "sock",
                 "started", "tls", "writing")  # fmt: skip

    def __init__(self, server: KeServer, sock: socket.socket, peer: str, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.loop = loop
        self.started = time.monotonic()
        self.tls = SSL.Connection(server.certs.context, sock)
        self.tls.set_accept_state()
        self.session = KeServerSession(server.settings, server.keyring, server.decided)
        self.handshaken = False
        self.pending: bytes | None = None  # the response, until the socket took all of it
        self.writing = False  # waiting for the socket to be writable rather than readable
        self.closed = False
        self.outcome: str | None = None  # how it ended, counted once (the first word stands)
        if server.poller is not None:
            server.poller.register(self.fd, select.EPOLLIN)
        else:
            loop.add_reader(self.fd, self.step)

    def step(self) -> None:
        if self.closed:  # closed (by the deadline, say) after this call was already queued
            return
        try:
            if self.pending is None:
                self._advance()
            if self.pending is not None:
                self._send()
        except SSL.WantReadError:
            self._wait(writing=False)
        except SSL.WantWriteError:
            self._wait(writing=True)
        except AlpnRefused:
            self.end("refused_alpn", self.peer)  # OpenSSL has sent the no_application_protocol alert
            self.close()
        except (SSL.ZeroReturnError, SSL.SysCallError):  # the peer closed (close_notify, FIN) or reset
            self.end("client_closed_early")
            self.close()
        except SSL.Error:
            self.end("tls_error" if self.handshaken else "handshake_failed", self.peer)
            self.close()
        except ParseError as exc:
            self.end(f"refused_{exc.code}", self.peer)
            self.close()
        except Exception:  # a bug must cost this session only, and say so once
            self.end("internal_error")
            log.exception("internal error in an NTS-KE session with %s (closed)", self.peer)
            self.close()

    def _advance(self) -> None:
        """Handshake, then read the request until it is complete and the response is known."""
        tls = self.tls
        if not self.handshaken:
            tls.do_handshake()
            self.handshaken = True
            if not alpn_chosen(tls):  # a client that offered no ALPN at all
                self.end("refused_no_alpn", self.peer)
                self.close()
                return
        while self.pending is None:
            reply = self.session.receive(tls.recv(4096), self._export, self.server.wall_clock())
            if reply is not None:
                self.end(reply.outcome)
                self.pending = reply.data

    def _export(self, label: bytes, length: int, context: bytes) -> bytes:
        return bytes(self.tls.export_keying_material(label, length, context))

    def end(self, outcome: str, peer: str | None = None) -> None:
        """Count how the session ended, once: a reply already decided stays the outcome when the
        peer then goes away before taking it."""
        if self.outcome is None:
            self.outcome = outcome
            self.server.count(outcome, peer)

    def _send(self) -> None:
        """Write the response (one TLS record: some clients need the answer in a single read),
        then close_notify, then close."""
        assert self.pending is not None
        self.tls.send(self.pending)  # partial writes are whole records: all of it, or WantWrite
        try:
            self.tls.shutdown()
        except SSL.Error:  # the peer is gone already: nothing more to say to it
            pass
        self.close()

    def _wait(self, writing: bool) -> None:
        if self.closed or writing == self.writing:
            return
        if self.server.poller is not None:
            self.server.poller.modify(self.fd, select.EPOLLOUT if writing else select.EPOLLIN)
        elif writing:
            self.loop.remove_reader(self.fd)
            self.loop.add_writer(self.fd, self.step)
        else:
            self.loop.remove_writer(self.fd)
            self.loop.add_reader(self.fd, self.step)
        self.writing = writing

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.forget(self.fd)
        # (an epoll set drops a socket when it is closed: no other descriptor refers to it)
        if self.server.poller is None:
            if self.writing:
                self.loop.remove_writer(self.fd)
            else:
                self.loop.remove_reader(self.fd)
        self.sock.close()
