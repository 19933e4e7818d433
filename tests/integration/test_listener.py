"""The UDP listener in-process: deferred replies from an asynchronous authenticator."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import ClassVar

from nts.core.auth import Authenticator, ReplyContext, Request
from nts.core.clockstate import ClockSettings, server_state
from nts.core.decisions import Defer, Drop, Nak
from nts.core.pipeline import Pipeline
from nts.server.udp import UdpListener, open_udp_socket
from tests.helpers import client_request


class SlowSigner(Authenticator):
    """Defers 20-byte-trailer requests; `complete` answers after a delay, or fails when asked to."""

    name: ClassVar[str] = "slow"
    order: ClassVar[int] = 10

    def matches(self, request: Request) -> bool:
        return len(request.trailer) == 20

    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak | Drop | Defer:
        return Defer(self, (ctx.reply_header(request.data, request.rx_ns), request.trailer), request.client)

    async def complete(self, job: object) -> bytes | None:
        header, trailer = job  # type: ignore[misc]
        await asyncio.sleep(0.01)
        if trailer[0] == 0xFF:
            raise RuntimeError("signer exploded")
        return None if trailer[0] == 0xEE else header + trailer


async def _exchange(port: int, packets: list[bytes]) -> list[bytes | None]:
    loop = asyncio.get_running_loop()
    out: list[bytes | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        for packet in packets:
            await loop.sock_sendall(s, packet)
            try:
                out.append(await asyncio.wait_for(loop.sock_recv(s, 200), 1.0))
            except TimeoutError:
                out.append(None)
    return out


def test_deferred_replies_are_sent_from_the_loop_and_failures_counted() -> None:
    async def main() -> None:
        sock = open_udp_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())
        pipeline = Pipeline(state=state, authenticators=[SlowSigner()], clock=time.time_ns)
        listener = UdpListener(sock, pipeline)
        listener.start(asyncio.get_running_loop())
        try:
            ok = client_request() + bytes([1]) + bytes(19)
            refused = client_request() + bytes([0xEE]) + bytes(19)
            broken = client_request() + bytes([0xFF]) + bytes(19)
            replies = await _exchange(port, [ok, refused, broken, ok])
        finally:
            listener.stop()
        assert replies[0] is not None and len(replies[0]) == 68 and replies[0][48:] == ok[48:]
        assert replies[1] is None and replies[2] is None
        assert replies[3] is not None
        counts = pipeline.counters()
        assert counts[("replies", "slow")] == 2
        assert counts[("drops", "slow_failed")] == 1
        assert counts[("drops", "slow_error")] == 1
        assert counts[("deferred", "slow")] == 4
        assert counts[("requests",)] == 4

    asyncio.run(main())


class Exploding(SlowSigner):
    """A plugin with a bug: raises on requests whose trailer starts with 0xEE."""

    name: ClassVar[str] = "exploding"

    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak | Drop | Defer:
        if request.trailer[0] == 0xEE:
            raise RuntimeError("plugin bug")
        return ctx.reply_header(request.data, request.rx_ns) + request.trailer


def test_a_plugin_bug_costs_one_datagram_not_the_listener() -> None:
    async def main() -> None:
        sock = open_udp_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())
        pipeline = Pipeline(state=state, authenticators=[Exploding()], clock=time.time_ns)
        listener = UdpListener(sock, pipeline)
        listener.start(asyncio.get_running_loop())
        try:
            bad = client_request() + bytes([0xEE]) + bytes(19)
            good = client_request() + bytes([1]) + bytes(19)
            replies = await _exchange(port, [bad, good, bad, good])
        finally:
            listener.stop()
        assert [r is not None for r in replies] == [False, True, False, True]
        assert pipeline.counters()[("drops", "internal_error")] == 2

    asyncio.run(main())
