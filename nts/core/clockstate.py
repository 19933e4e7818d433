"""What the server says about its own clock: leap, stratum, reference id, root delay/dispersion.

Strategy: sans-IO. The shell reads the kernel's clock state (adjtimex) and hands it in as a
`KernelClock`; `server_state` turns that and the `clock` config into the `ServerState` every reply
carries. An unsynchronised kernel clock yields leap 3 (alarm) and stratum 16, so clients will not
follow us, unless the operator declares a local reference (labs, isolated networks). `Replies`
turns a state and the injected clock into reply headers: the ReplyContext every handler builds
its answers with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..wire.packet import Leap, ReplyHeader, kiss_of_death
from ..wire.timestamps import seconds_to_short, unix_ns_to_ntp64

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
    reference_id: bytes = b"KERN"
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


class Replies:
    """The ReplyContext handlers build answers with: the server state's header and the clock."""

    __slots__ = ("build", "clock")

    def __init__(self, state: ServerState, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.build = ReplyHeader(
            state.leap,
            state.stratum,
            state.precision,
            state.root_delay,
            state.root_dispersion,
            state.reference_id,
            state.reference_ts,
        ).build

    def reply_header(self, request: bytes, rx_ns: int, tx_delay_ns: int = 0) -> bytes:
        return self.build(request, rx_ns, self.clock() + tx_delay_ns)

    def kiss(self, request: bytes, code: bytes, rx_ns: int) -> bytes:
        return kiss_of_death(request, code, unix_ns_to_ntp64(rx_ns), unix_ns_to_ntp64(self.clock()))
