"""What the server says about its own clock: leap, stratum, reference id, root delay/dispersion.

Strategy: sans-IO. The shell reads the kernel's clock state (adjtimex) and hands it in as a
`KernelClock`; `server_state` turns that and the `clock` config into the `ServerState` every reply
carries. An unsynchronised kernel clock yields leap 3 (alarm) and stratum 16, so clients will not
follow us, unless the operator declares a local reference (labs, isolated networks). `Replies`
turns a state and the injected clock into reply headers: the ReplyContext every handler builds
its answers with.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from threading import get_ident

from ..wire.packet import Leap, Mode, kiss_of_death
from ..wire.timestamps import MASK64, NTP_SCALED_OFFSET, seconds_to_short, unix_ns_to_ntp64
from .interleave import TxLag, TxTimestamps

STA_INS = 0x0010
STA_DEL = 0x0020
STA_UNSYNC = 0x0040
TIME_INS = 1
TIME_DEL = 2
TIME_ERROR = 5


@dataclass(frozen=True, slots=True)
class KernelClock:
    """One adjtimex(2) reading: return state, status bits and error estimates in microseconds."""

    state: int
    status: int
    maxerror_us: int
    esterror_us: int

    @property
    def synchronized(self) -> bool:
        return self.state != TIME_ERROR and not self.status & STA_UNSYNC


@dataclass(frozen=True, slots=True)
class ClockSettings:
    stratum: int = 2
    reference_id: bytes = b"\x7f\x00\x00\x01"  # 127.0.0.1: an address, as stratum 2 wants (RFC 5905 7.3)
    local_reference: bool = False
    root_delay: float = 0.0  # seconds, added to what the kernel reports
    root_dispersion: float = 0.0  # seconds, floor for the dispersion reported


@dataclass(frozen=True, slots=True)
class ServerState:
    leap: int
    stratum: int
    precision: int
    root_delay: int  # NTP short format
    root_dispersion: int  # NTP short format
    reference_id: bytes
    reference_ts: int  # NTP 64-bit


def server_state(settings: ClockSettings, kernel: KernelClock | None, precision: int, now_ns: int) -> ServerState:
    """Combine config and the kernel reading into the state advertised in replies."""
    if settings.local_reference:
        return ServerState(
            Leap.NONE,
            settings.stratum,
            precision,
            seconds_to_short(settings.root_delay),
            seconds_to_short(settings.root_dispersion),
            settings.reference_id,
            unix_ns_to_ntp64(now_ns),
        )
    if kernel is None or not kernel.synchronized:
        return ServerState(Leap.ALARM, 16, precision, 0, 0, settings.reference_id, 0)
    if kernel.state == TIME_INS or kernel.status & STA_INS:
        leap = Leap.INSERT
    elif kernel.state == TIME_DEL or kernel.status & STA_DEL:
        leap = Leap.DELETE
    else:
        leap = Leap.NONE
    dispersion = max(settings.root_dispersion, kernel.maxerror_us / 1e6)
    return ServerState(
        leap,
        settings.stratum,
        precision,
        seconds_to_short(settings.root_delay),
        seconds_to_short(dispersion),
        settings.reference_id,
        unix_ns_to_ntp64(now_ns),
    )


_REPLY = struct.Struct(">2s1s21s8sQQ")  # LI/VN/mode + stratum, poll, the state's bytes, origin, receive, transmit


_REPLY_Q = struct.Struct(">2sB21sQQQ")  # the same with poll and origin as numbers (interleaved replies)
_THREE = struct.Struct(">QQQ")  # a request's origin, receive and transmit timestamps
_EVEN64 = MASK64 - 1  # a transmit timestamp goes out with its lowest bit clear, a receive one with it set


class Replies:
    """The ReplyContext handlers build answers with, and the one builder of time-reply headers
    (RFC 5905 section 7.3): what depends only on the server state is packed once, so a reply costs
    one struct.pack. Version and poll are the request's, origin its transmit timestamp; the transmit
    time is read from the injected clock as the last step, plus the running estimate of how late the
    reply leaves after that (`TxLag`). With `timestamps`, requests in interleaved mode (RFC 9769)
    get interleaved replies (`interleave`); `client` is the address of the request being answered.
    A symmetric active request (mode 1) is answered in symmetric passive mode (2)."""

    __slots__ = ("_first", "_lag", "_middle", "_tx_offset", "client", "clock", "timestamps")

    def __init__(self, state: ServerState, clock: Callable[[], int], timestamps: TxTimestamps | None = None) -> None:
        self.clock = clock
        self.timestamps = timestamps
        self._lag = timestamps.lag if timestamps is not None else TxLag(enabled=False)
        # the conversion's offset with the correction in it (the lag, taken when the state is, each
        # second), so a basic reply pays no addition for it
        self._tx_offset = NTP_SCALED_OFFSET + (self._lag.ns << 32)
        self.client = ""
        mode = [Mode.SERVER, Mode.SYMMETRIC_PASSIVE]  # for client (3) and symmetric active (1) requests
        self._first = [bytes(((state.leap << 6) | (v << 3) | mode[m == 1], state.stratum))
                       for v in range(8) for m in range(8)]  # by the request's first byte: version, mode  # fmt: skip
        self._middle = struct.pack(
            ">bII4sQ", state.precision, state.root_delay, state.root_dispersion, state.reference_id, state.reference_ts
        )

    def reply_header(self, request: bytes, rx_ns: int, tx_delay_ns: int = 0) -> bytes:
        # The two timestamps are `unix_ns_to_ntp64` written out: calling it costs 4% of the
        # instructions of a plain reply (a property test checks the two agree).
        timestamps, offset = self.timestamps, self._tx_offset
        if timestamps is not None:
            if request[31] & 1:  # the origin is one of our receive timestamps
                return self._interleave(request, rx_ns, tx_delay_ns)
            if timestamps.cold:
                offset = NTP_SCALED_OFFSET + (timestamps.cold_ns << 32)
        return _REPLY.pack(
            self._first[request[0] & 63],
            request[2:3],
            self._middle,
            request[40:48],
            ((((rx_ns << 32) + NTP_SCALED_OFFSET) // 1_000_000_000) & MASK64) | 1,
            ((((self.clock() + tx_delay_ns) << 32) + offset) // 1_000_000_000) & _EVEN64,
        )

    def _interleave(self, request: bytes, rx_ns: int, tx_delay_ns: int) -> bytes:
        """A request that quotes one of our receive timestamps as its origin: NTPv4 with distinct
        receive and transmit fields is in interleaved mode (a basic client's two would be equal, or
        zero): answered with the transmit time of the reply it quotes when that is known for it,
        else in basic mode. Either way this reply is noted, for the next one."""
        timestamps = self.timestamps
        assert timestamps is not None
        rx = ((((rx_ns << 32) + NTP_SCALED_OFFSET) // 1_000_000_000) & MASK64) | 1
        now = self.clock()
        quoted, received, sent = _THREE.unpack_from(request, 24)
        first = request[0]
        earlier = None
        if (first >> 3) & 7 == 4 and received != sent and get_ident() == timestamps.thread:  # (not a deferred
            earlier = timestamps.exchange(quoted, rx, self.client, now)  # reply, on another thread)
        if earlier is None:  # basic mode
            lag = timestamps.cold_ns if timestamps.cold else self._lag.ns
            received, earlier = sent, now + lag + tx_delay_ns
        return _REPLY_Q.pack(
            self._first[first & 63],
            request[2],
            self._middle,
            received,  # (the origin: the request's receive field, in interleaved mode)
            rx,
            (((earlier << 32) + NTP_SCALED_OFFSET) // 1_000_000_000) & _EVEN64,
        )

    def kiss(self, request: bytes, code: bytes, rx_ns: int) -> bytes:
        return kiss_of_death(request, code, unix_ns_to_ntp64(rx_ns), unix_ns_to_ntp64(self.clock()))
