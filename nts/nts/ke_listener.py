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

Admission favours connections that make progress, as hardened HTTP servers do, because a flood of
connections that never finish (and come back the moment they are closed) must not crowd out the
clients that do. A connection accepted is only a descriptor and a few fields (`Waiting`) until its
first bytes arrive: no TLS state, so thousands cost little, and it waits at most
`first_bytes_timeout`. When the waiting room is full the oldest waiter makes room; on its first
bytes a connection becomes a session (TLS objects, the sans-IO session), and when every session
slot is taken, a connection whose first TLS record is whole (as a real client's ClientHello is)
evicts the session that is still in its handshake and has been idle longest (never one that has
finished it). A connection that cannot have a slot (none to take, or its client, an address or an
IPv6 /64, has `max_per_client` sessions) is parked: left unread until its deadline, then reset,
because an attacker's connection closed at once comes straight back, at whatever rate the server
can close them. Refusals at accept (access lists, the per-address rate) come before anything is
allocated; a refused connection too is held, unread, to its deadline. Refused, evicted and
timed-out connections are reset (SO_LINGER 0: no TIME_WAIT here).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import math
import resource
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

from ..core.policy import ALLOW, RATE_OK, AccessPolicy, NetworkSet, RateLimiter, RateSettings, Shared
from ..core.stats import Counters
from ..logutil import RateLimitedLog
from ..net import client_key
from ..wire import proxy
from ..wire.errors import ParseError
from .aead import AEADS, AeadId
from .certs import AlpnRefused, CertStore, alpn_chosen
from .cookies import KeyRing
from .ke_session import DecidedRequests, KeServerSession, KeSettings

log = logging.getLogger("ntsd.nts")


_SWEEP_S = 0.1  # how often session deadlines are checked
_ACCEPTS = 128  # connections accepted per readiness event, so sessions under way keep their turn
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "EPOLLRDHUP") else 0
_COUNTED = "counted"  # a parked connection whose outcome was counted when it was parked (a refusal)
_KEEP_ALIVE_REPLIES = 10_000  # replies on one Keep Alive connection; then it is closed after the next
_ACCEPT_RETRY_S = 1.0  # the pause after accept() failed for want of descriptors or memory


class Waiting:
    """An accepted connection that has sent nothing yet: all a connection costs until it does."""

    __slots__ = ("fd", "key", "parked", "peer", "proxied", "sock", "started")

    def __init__(self, sock: socket.socket, peer: str, key: str, proxied: bool = False) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer  # the client: the address it connected from, or the one a PROXY header named
        self.key = key  # the client, as per-client limits count it
        self.started = time.monotonic()
        self.parked = ""  # why its bytes are left unread until its deadline ("busy", "per_client")
        self.proxied = proxied  # from a load balancer, and its PROXY header not read yet


class KeServer:
    """Accepts NTS-KE sessions on any number of listening sockets."""

    def __init__(self, certs: CertStore, keyring: KeyRing, settings: KeSettings, stats: Counters) -> None:
        self.certs = certs
        self.keyring = keyring
        self.settings = settings
        self.stats = stats
        self.shared = Shared(AccessPolicy())  # the server's access lists and workers (set by the plugin)
        self._limiter = self._new_limiter(settings)
        self._exempt = NetworkSet(settings.exempt)
        self._proxies = NetworkSet(settings.proxies)  # balancers whose connections begin with a PROXY header
        self._events = RateLimitedLog(log)
        self._alarms = RateLimitedLog(log, level=logging.WARNING)
        self.wall_clock: Callable[[], float] = time.time
        self._listeners: list[socket.socket] = []
        self._sessions: dict[int, KeSession] = {}  # by socket fd, oldest first
        self._waiting: dict[int, Waiting] = {}  # accepted, nothing received yet; by fd, oldest first
        self._per_client: dict[str, int] = {}  # sessions under way per client key
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.poller: select.epoll | None = None  # the connections' sockets (Linux, once started), as one reader
        self.decided = DecidedRequests()  # whole requests seen before, shared by this server's sessions
        self._descriptors = 1 << 30  # connections that may wait, as the descriptor limit allows (at start)
        self.turns = itertools.count()  # sessions answered: which NTP server of several the next one names
        self.kept = 0  # connections the NTS pool keeps alive

    @property
    def active(self) -> int:
        """Sessions under way (past their first bytes)."""
        return len(self._sessions)

    @property
    def waiting(self) -> int:
        """Connections accepted that have sent nothing yet."""
        return len(self._waiting)

    @property
    def sessions(self) -> tuple[KeSession, ...]:
        """The sessions under way, oldest first."""
        return tuple(self._sessions.values())

    def configure(self, settings: KeSettings) -> None:
        if (settings.rate, settings.burst) != (self.settings.rate, self.settings.burst):
            self._limiter = self._new_limiter(settings)
        changed = settings.first_bytes_timeout != self.settings.first_bytes_timeout
        if settings.exempt != self.settings.exempt:
            self._exempt = NetworkSet(settings.exempt)
        if settings.proxies != self.settings.proxies:
            self._proxies = NetworkSet(settings.proxies)
        self.settings = settings
        if changed:
            for sock in self._listeners:
                self._defer(sock)

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
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit != resource.RLIM_INFINITY:
            self._descriptors = max(64, limit - self.shared.count(self.settings.max_connections) - 512)
            if self._descriptors < self.shared.count(self.settings.max_pending):
                log.warning("NTS-KE: the descriptor limit (%d) lets %d connections wait for their first bytes, "
                            "not nts.max_pending_connections (raise LimitNOFILE / ulimit -n)", limit,
                            self._descriptors)  # fmt: skip
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
        self._defer(sock)
        self._loop.add_reader(sock.fileno(), self._accept, sock, self._loop)
        self._listeners.append(sock)

    def _defer(self, sock: socket.socket) -> None:
        """Have the kernel hold a new connection until its first bytes, for about the first-bytes
        deadline (TCP_DEFER_ACCEPT, Linux): a silent connection then costs the server nothing until
        the kernel hands it over anyway, when the deadline here takes over."""
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, math.ceil(self.settings.first_bytes_timeout)
                )

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
        for waiting in list(self._waiting.values()):
            self._drop(waiting, "")
        if self.poller is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.poller.fileno())
            self.poller.close()
            self.poller = None

    def step_ready(self) -> None:
        """Step every session whose socket is ready, and make sessions of the waiting connections
        whose first bytes came (the loop saw the epoll set readable)."""
        assert self.poller is not None
        sessions = self._sessions
        for fd, events in self.poller.poll(0):
            session = sessions.get(fd)
            if session is not None:
                session.step()
            else:
                waiting = self._waiting.get(fd)
                if waiting is not None:
                    self._ready(waiting, events & _ENDED != 0)

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
            if self._proxies.networks and peer in self._proxies:  # a balancer's: admitted once its header is read
                try:
                    sock.setblocking(False)
                    self._from_balancer(Waiting(sock, peer, client_key(peer), proxied=True), loop)
                except Exception:  # a bug must cost this connection only, and say so
                    log.exception("internal error accepting an NTS-KE connection from %s (closed)", peer)
                    sock.close()
                continue
            refusal = self.admit(peer)
            if refusal is not None:
                self.count(refusal, peer)
            else:
                self.count("connections")
            try:
                sock.setblocking(False)
                self._hold(Waiting(sock, peer, client_key(peer)), loop, refusal)
            except Exception:  # a bug must cost this connection only, and say so
                self.count("internal_error")
                log.exception("internal error accepting an NTS-KE connection from %s (closed)", peer)
                sock.close()

    def _hold(self, waiting: Waiting, loop: asyncio.AbstractEventLoop, refusal: str | None = None) -> None:
        """Keep an accepted connection until its first bytes (or its deadline, or eviction); a
        refused one (counted already) is held unread until its deadline, as a parked one is."""
        room = min(self.shared.count(self.settings.max_pending), self._descriptors)
        while len(self._waiting) >= room:  # the oldest waiter makes room
            self._alarms("evicting", "NTS-KE: %d connections wait for their first bytes: closing the oldest "
                         "for each new one (a flood of idle connections?)", len(self._waiting))  # fmt: skip
            oldest = self._waiting[next(iter(self._waiting))]
            evicted = "proxy_evicted" if oldest.proxied else "evicted"
            self._drop(oldest, _COUNTED if oldest.parked == _COUNTED else evicted)
        self._waiting[waiting.fd] = waiting
        if refusal is not None:
            waiting.parked = _COUNTED
            return
        if self.poller is not None:  # edge-triggered: told again only when more bytes come
            # (looking at once instead, before the loop's turn, measured 4% fewer sessions/s: the
            # session then takes one more read that finds nothing)
            self.poller.register(waiting.fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        else:
            loop.add_reader(waiting.fd, self._first_bytes, waiting.fd)

    def _first_bytes(self, fd: int) -> None:
        """(Without epoll) a waiting connection is readable."""
        waiting = self._waiting.get(fd)
        if waiting is not None:
            self._ready(waiting)

    def _ready(self, waiting: Waiting, ended: bool = False) -> None:
        """Bytes came on a waiting connection. Until its first TLS record is whole (a real client
        sends its ClientHello at once; a trickling attacker never finishes it) it goes on waiting.
        Then it becomes a session, in a free slot or in the one of the session that has made least
        progress (in its handshake, idle longest). When there is none, or its client has
        `max_per_client` sessions already, it is parked: left unread until its deadline, then reset
        (closing it at once would only bring it back). `ended`: the peer has closed or reset it (a
        session sees that at once, and counts it)."""
        settings = self.settings
        if waiting.proxied:
            return self._proxy_header(waiting, ended)
        if self.poller is not None and not ended:
            first = _first_record(waiting.sock)
            if first is _PARTIAL:
                return None
            if first is _PROXY_HEADER:  # from a peer not named in nts.proxy_protocol
                return self._drop(waiting, "unexpected_proxy_header", waiting.peer)
        if self._per_client.get(waiting.key, 0) >= self.shared.count(settings.max_per_client) and (
            waiting.peer not in self._exempt
        ):
            return self._park(waiting, "per_client")
        if len(self._sessions) >= self.shared.count(settings.max_connections):
            victim = self._least_progress()
            if victim is None:
                return self._park(waiting, "busy")
            self._alarms("full", "NTS-KE: every session slot is taken: evicting the idlest handshake for each "
                         "new client that is ready (a flood of slow handshakes?)")  # fmt: skip
            victim.end("evicted")
            victim.close()
        del self._waiting[waiting.fd]
        if self.poller is None and self._loop is not None:
            self._loop.remove_reader(waiting.fd)
        assert self._loop is not None
        try:
            session = KeSession(self, waiting.sock, waiting.peer, self._loop, self.poller is not None, waiting.key)
        except Exception:  # a bug must cost this connection only, and say so
            self.count("internal_error")
            log.exception("internal error setting up an NTS-KE session with %s (closed)", waiting.peer)
            _reset(waiting.sock)
            return
        session.started = waiting.started
        self.adopt(session)
        session.step()

    def _from_balancer(self, waiting: Waiting, loop: asyncio.AbstractEventLoop) -> None:
        """A balancer's connection, just accepted: its PROXY header is usually in already (the
        kernel defers the accept until the first bytes), so it is read now, and the connection then
        waits for its ClientHello as any other (reading the header on a later turn of the loop cost
        a wake-up per session, 4-7% of the sessions per second with EC certificates)."""
        try:
            header = _take_header(waiting.sock)
        except ParseError as exc:
            self.count(exc.code, waiting.peer)
            _reset(waiting.sock)
            return
        if header is None:  # not whole yet: read when more comes
            self._hold(waiting, loop)
        else:
            self._hold(waiting, loop, self._believe(waiting, header))

    def _proxy_header(self, waiting: Waiting, ended: bool) -> None:
        """More bytes on a balancer's connection whose PROXY header was not whole when accepted."""
        try:
            header = _take_header(waiting.sock)
        except ParseError as exc:
            return self._drop(waiting, exc.code, waiting.peer)
        if header is None:
            if ended:
                self._drop(waiting, "proxy_truncated", waiting.peer)
            return None
        refusal = self._believe(waiting, header)
        if refusal is not None:  # held unread to its deadline, as any refused connection
            self._park(waiting, _COUNTED)
            return None
        self._ready(waiting, ended)  # (its first record may be in already: no new edge would come)
        return None

    def _believe(self, waiting: Waiting, header: proxy.ProxyHeader) -> str | None:
        """From now on the client a balancer's header names is the peer: admission, per-client
        limits, logs and metrics are about it (a LOCAL header, the balancer's health check, leaves
        the balancer the peer). The refusal counted, if the client is refused."""
        waiting.proxied = False
        if header.client is not None:
            waiting.peer, waiting.key = header.client[0], client_key(header.client[0])
            refusal = self.admit(waiting.peer)
            if refusal is not None:
                self.count(refusal, waiting.peer)
                return refusal
        self.count("connections")
        return None

    def _park(self, waiting: Waiting, why: str) -> None:
        waiting.parked = why
        if self.poller is not None:
            self.poller.unregister(waiting.fd)
        elif self._loop is not None:
            self._loop.remove_reader(waiting.fd)

    def _least_progress(self) -> KeSession | None:
        """The session to evict for a newer one: of those still in their handshake, the one that has
        been idle longest; None when every session has finished its handshake."""
        victim: KeSession | None = None
        for session in self._sessions.values():
            if not session.handshaken and (victim is None or session.active < victim.active):
                victim = session
        return victim

    def _drop(self, waiting: Waiting, outcome: str, peer: str | None = None) -> None:
        """Close a waiting connection with a reset; `outcome` counted (none: the server stops)."""
        del self._waiting[waiting.fd]
        if outcome and outcome != _COUNTED:
            self.count(outcome, peer)
        if self.poller is None and self._loop is not None and not waiting.parked:
            self._loop.remove_reader(waiting.fd)
        _reset(waiting.sock)  # (closing it takes it out of the epoll set)

    def adopt(self, session: KeSession) -> None:
        """Serve `session` (accepted here, or built by a test around a socket pair)."""
        self._sessions[session.fd] = session
        self._per_client[session.key] = self._per_client.get(session.key, 0) + 1

    def _resume(self, listener: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        if listener in self._listeners:  # not stopped meanwhile
            loop.add_reader(listener.fileno(), self._accept, listener, loop)

    def _sweep(self) -> None:
        """Close the connections past their deadline (both dicts are in order of arrival)."""
        assert self._loop is not None
        self._sweeper = self._loop.call_later(_SWEEP_S, self._sweep)
        now = time.monotonic()
        for waiting in _started_before(self._waiting, now - self.settings.first_bytes_timeout):
            self._drop(waiting, waiting.parked or ("proxy_timeout" if waiting.proxied else "no_first_bytes"))
        for session in _started_before(self._sessions, now - self.settings.session_timeout):
            session.end("timeout", session.peer)
            session.close()

    def keep_alive_room(self) -> bool:
        return self.kept < self.shared.count(self.settings.pool_connections)

    def refresh(self, session: KeSession) -> None:
        """A Keep Alive connection waits for its next request: its deadline starts again (and it
        goes to the end of the sessions, which the sweep reads oldest first)."""
        session.started = time.monotonic()
        if self._sessions.pop(session.fd, None) is not None:
            self._sessions[session.fd] = session

    def forget(self, session: KeSession) -> None:
        if self._sessions.pop(session.fd, None) is not None:
            left = self._per_client.get(session.key, 0) - 1
            if left > 0:
                self._per_client[session.key] = left
            else:
                self._per_client.pop(session.key, None)

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
        if self._limiter.check(ip, time.monotonic_ns()) != RATE_OK and ip not in self._exempt:
            return "refused_rate"
        return None


def _started_before(connections: dict[int, Waiting] | dict[int, KeSession], deadline: float) -> list[Any]:
    """The connections that started before `deadline`: the first ones of a dict kept in order of
    arrival (taken as a list: the caller closes them, which takes them out of the dict)."""
    out = []
    for connection in connections.values():
        if connection.started > deadline:
            break
        out.append(connection)
    return out


_PEEK = bytearray(4096)  # (the loop's thread only)
_TLS_HANDSHAKE = 22


_WHOLE, _PARTIAL, _PROXY_HEADER = "whole", "partial", "proxy"


def _first_record(sock: socket.socket) -> str:
    """Whether the first TLS record a connection sent has fully arrived (_WHOLE; also when it is
    not TLS at all, which fails at once): what a real client's first flight looks like, and a
    trickling attacker's not (_PARTIAL); or whether it begins with a PROXY header (_PROXY_HEADER)."""
    try:
        got = sock.recv_into(_PEEK, len(_PEEK), socket.MSG_PEEK)
    except BlockingIOError:
        return _PARTIAL  # nothing yet (the kernel's deferral ran out before a byte came)
    except OSError:
        return _WHOLE  # (reset: the session's first step sees it and ends)
    if got and _PEEK[0] != _TLS_HANDSHAKE:
        return _PROXY_HEADER if proxy.is_proxy_start(bytes(_PEEK[: min(got, 12)])) else _WHOLE
    if got < 5:
        return _WHOLE if got == 0 else _PARTIAL
    return _WHOLE if got >= min(5 + int.from_bytes(_PEEK[3:5], "big"), len(_PEEK)) else _PARTIAL


def _take_header(sock: socket.socket) -> proxy.ProxyHeader | None:
    """The PROXY header (HAProxy's protocol, v2 or v1) that must begin a balancer's connection,
    taken off the socket; None while it is not whole; ParseError when it cannot become one (missing,
    malformed, a family other than TCP over IPv4 or IPv6, too long)."""
    try:
        got = sock.recv_into(_PEEK, proxy.MAX_LENGTH, socket.MSG_PEEK)
    except OSError:  # nothing yet, or reset (which the connection's end or deadline will see)
        return None
    header = proxy.parse(bytes(_PEEK[:got]))
    if header is not None:
        sock.recv_into(_PEEK, header.length)  # (all there: it was just peeked)
    return header


def _reset(sock: socket.socket) -> None:
    """Close a connection with a reset (refused, evicted or late: nothing more is owed to it)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except OSError:  # (already reset by the peer)
        pass
    sock.close()


ADMISSION_REFUSALS = ("refused_access", "refused_rate")


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
    if what.startswith("proxy_"):  # a balancer's connection closed before it named a client
        return ("nts_ke_refused", what)
    if what.startswith("pool_reply_"):  # a reply on a Keep Alive connection (not its outcome)
        return ("nts_ke_pool_replies", what.removeprefix("pool_reply_"))
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

    __slots__ = ("active", "closed", "fd", "handshaken", "keep", "kept", "key", "loop", "outcome", "peer", "pending",
                 "replies", "server", "session", "sock", "started", "tls", "writing")  # fmt: skip

    def __init__(
        self,
        server: KeServer,
        sock: socket.socket,
        peer: str,
        loop: asyncio.AbstractEventLoop,
        registered: bool = False,
        key: str | None = None,
    ) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.key = key if key is not None else client_key(peer)
        self.loop = loop
        self.started = self.active = time.monotonic()  # accepted; last stepped
        self.tls = SSL.Connection(server.certs.context, sock)
        self.tls.set_accept_state()
        self.session = self._new_session()
        self.keep = ""  # the reply pending granted Keep Alive: its outcome (the NTS pool's requests)
        self.kept = False  # holds one of the server's Keep Alive slots
        self.replies = 0
        self.handshaken = False
        self.pending: bytes | None = None  # the response, until the socket took all of it
        self.writing = False  # waiting for the socket to be writable rather than readable
        self.closed = False
        self.outcome: str | None = None  # how it ended, counted once (the first word stands)
        if server.poller is not None:
            if registered:  # a waiting connection's socket, in the set already (edge-triggered)
                server.poller.modify(self.fd, select.EPOLLIN)
            else:
                server.poller.register(self.fd, select.EPOLLIN)
        else:
            loop.add_reader(self.fd, self.step)

    def step(self) -> None:
        if self.closed:  # closed (by the deadline, say) after this call was already queued
            return
        self.active = time.monotonic()
        try:
            while True:  # (a Keep Alive connection's next request may be read already)
                if self.pending is None:
                    self._advance()
                if self.pending is None or not self._send():
                    break
        except SSL.WantReadError:
            self._wait(writing=False)
        except SSL.WantWriteError:
            self._wait(writing=True)
        except AlpnRefused:
            self.end("refused_alpn", self.peer)  # OpenSSL has sent the no_application_protocol alert
            self.close()
        except (SSL.ZeroReturnError, SSL.SysCallError):  # the peer closed (close_notify, FIN) or reset
            self.end("pool_closed" if self.kept else "client_closed_early")
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
                if reply.keep_alive:  # counted as a reply; the connection's outcome comes at its end
                    self.keep = reply.outcome
                else:
                    self.end(reply.outcome)
                self.pending = reply.data

    def _new_session(self) -> KeServerSession:
        server = self.server
        return KeServerSession(server.settings, server.keyring, server.decided, server.turns, self._may_keep)

    def _may_keep(self) -> bool:
        """Whether a reply may grant Keep Alive: this connection holds a slot already, or one is
        free (`pool_connections`); and it has not had its share of requests."""
        return self.replies < _KEEP_ALIVE_REPLIES and (self.kept or self.server.keep_alive_room())

    def _export(self, label: bytes, length: int, context: bytes) -> bytes:
        return bytes(self.tls.export_keying_material(label, length, context))

    def end(self, outcome: str, peer: str | None = None) -> None:
        """Count how the session ended, once: a reply already decided stays the outcome when the
        peer then goes away before taking it."""
        if self.outcome is None:
            self.outcome = outcome
            self.server.count(outcome, peer)

    def _send(self) -> bool:
        """Write the response (one TLS record: some clients need the answer in a single read),
        then close_notify, then close; True when Keep Alive keeps the connection for another
        request instead (its deadline starts again)."""
        assert self.pending is not None
        self.tls.send(self.pending)  # partial writes are whole records: all of it, or WantWrite
        if self.keep:
            self.server.count(f"pool_reply_{self.keep}")
            self.keep, self.pending, self.replies = "", None, self.replies + 1
            if not self.kept:
                self.kept = True
                self.server.kept += 1
            self.session = self._new_session()
            self.server.refresh(self)
            return True
        try:
            self.tls.shutdown()
        except SSL.Error:  # the peer is gone already: nothing more to say to it
            pass
        self.close()
        return False

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
        if self.kept:
            self.server.kept -= 1
        self.server.forget(self)
        # (an epoll set drops a socket when it is closed: no other descriptor refers to it)
        if self.server.poller is None:
            if self.writing:
                self.loop.remove_writer(self.fd)
            else:
                self.loop.remove_reader(self.fd)
        self.sock.close()
