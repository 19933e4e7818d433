"""Hardware timestamps: a network card's own receive and transmit times, where the operator names it.

Strategy: as chrony's `hwtimestamp`. At start, before privileges are dropped (switching an
interface needs CAP_NET_ADMIN, and /dev/ptpN is root's), each interface named in
`ntp.hwtimestamp` ("*": every interface) is asked what it can timestamp (ETHTOOL_GET_TS_INFO).
One that stamps every packet it receives and sends in hardware and has a PTP hardware clock (PHC)
is switched on (SIOCSHWTSTAMP: transmit on; receive all, or NTP packets only where the card
filters them). The sockets then ask for raw hardware timestamps beside the software ones, and the
listeners use a packet's hardware time when it has one, converted from the PHC's clock to the
system clock (`PhcClock`): the PHC's offset is measured every second by reading the system clock
around the PHC (of several readings, the one with the shortest span wins) and extrapolated with
the drift between the last two measurements. An interface that is unknown, has no hardware
timestamping or refuses to switch (no privilege) is logged and keeps software timestamps; ntsd
never fails to start over it. Interfaces on different PHCs: only the first PHC's are used
(logged), as a packet's timestamp does not say which clock took it.

What this machine could test: the structures against the kernel's layouts, the conversion against
a simulated PHC, and the fall-back on real interfaces (loopback and veth have no hardware
timestamping); not a card that has it.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("ntsd.udp")

SIOCETHTOOL = 0x8946
SIOCSHWTSTAMP = 0x89B0
ETHTOOL_GET_TS_INFO = 0x41
SOF_TIMESTAMPING_TX_HARDWARE = 1 << 0
SOF_TIMESTAMPING_RX_HARDWARE = 1 << 2
SOF_TIMESTAMPING_RAW_HARDWARE = 1 << 6
SOCKET_FLAGS = SOF_TIMESTAMPING_RX_HARDWARE | SOF_TIMESTAMPING_RAW_HARDWARE  # added to a socket's
NEEDED = SOF_TIMESTAMPING_TX_HARDWARE | SOF_TIMESTAMPING_RX_HARDWARE | SOF_TIMESTAMPING_RAW_HARDWARE
HWTSTAMP_TX_ON = 1
HWTSTAMP_FILTER_ALL = 1
HWTSTAMP_FILTER_NTP_ALL = 15
_TS_INFO = struct.Struct("=IIiI12xI12x")  # struct ethtool_ts_info
_HWTSTAMP_CONFIG = struct.Struct("=iii")  # struct hwtstamp_config: flags, tx_type, rx_filter
_IFREQ = struct.Struct("@16sP16x")  # struct ifreq: the name, then ifr_data (a pointer) in its union
_CLOCKFD = 3
_SAMPLES = 8  # readings per offset measurement
_MAX_DRIFT = 500e-6  # a PHC's frequency error beyond this is a measurement gone wrong


@dataclass(frozen=True, slots=True)
class TsInfo:
    """What an interface can timestamp (struct ethtool_ts_info)."""

    so_timestamping: int
    phc_index: int
    tx_types: int
    rx_filters: int

    @classmethod
    def parse(cls, data: bytes) -> TsInfo:
        _cmd, flags, phc, tx_types, rx_filters = _TS_INFO.unpack_from(data)
        return cls(flags, phc, tx_types, rx_filters)

    def lacks(self) -> str:
        """Why hardware timestamps cannot be had here ("" when they can)."""
        if self.so_timestamping & NEEDED != NEEDED:
            return "it does not timestamp packets in hardware"
        if self.phc_index < 0:
            return "it has no PTP hardware clock"
        if not self.tx_types & (1 << HWTSTAMP_TX_ON):
            return "it cannot timestamp what it sends"
        if not self.rx_filters & (1 << HWTSTAMP_FILTER_ALL | 1 << HWTSTAMP_FILTER_NTP_ALL):
            return "it cannot timestamp every packet (or every NTP packet) it receives"
        return ""

    @property
    def rx_filter(self) -> int:
        return HWTSTAMP_FILTER_NTP_ALL if self.rx_filters & (1 << HWTSTAMP_FILTER_NTP_ALL) else HWTSTAMP_FILTER_ALL


def _ioctl(name: str, request: int, data: ctypes.Array[ctypes.c_char]) -> None:
    """An interface ioctl whose ifreq points at `data` (which the kernel reads and writes)."""
    ifreq = bytearray(_IFREQ.pack(name.encode()[:15], ctypes.addressof(data)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), request, ifreq)


def ts_info(name: str) -> TsInfo:
    """What interface `name` can timestamp (OSError: no such interface, or no ethtool support)."""
    data = ctypes.create_string_buffer(_TS_INFO.pack(ETHTOOL_GET_TS_INFO, 0, -1, 0, 0), _TS_INFO.size)
    _ioctl(name, SIOCETHTOOL, data)
    return TsInfo.parse(data.raw)


def switch_on(name: str, info: TsInfo) -> None:
    """Have interface `name` timestamp what it sends and receives (OSError: refused)."""
    data = ctypes.create_string_buffer(_HWTSTAMP_CONFIG.pack(0, HWTSTAMP_TX_ON, info.rx_filter), _HWTSTAMP_CONFIG.size)
    _ioctl(name, SIOCSHWTSTAMP, data)


class PhcClock:
    """A PTP hardware clock and its offset from the system clock; `to_system` converts its times.
    `measure` runs on the server's loop, `to_system` on the listeners' threads: the model is one
    tuple, replaced whole."""

    def __init__(
        self,
        index: int,
        read_phc: Callable[[], int],
        read_system: Callable[[], int] = time.time_ns,
        fd: int = -1,
    ) -> None:
        self.index = index
        self._read_phc, self._read_system, self._fd = read_phc, read_system, fd
        self._model: tuple[int, int, float] | None = None  # offset (phc - system), at phc time, drift
        self.span_ns = 0  # how long the best reading of the last measurement took (its uncertainty)

    @classmethod
    def open(cls, index: int) -> PhcClock:
        fd = os.open(f"/dev/ptp{index}", os.O_RDONLY | os.O_CLOEXEC)
        clock = (~fd << 3) | _CLOCKFD  # the dynamic POSIX clock of that device (FD_TO_CLOCKID)
        return cls(index, lambda: time.clock_gettime_ns(clock), fd=fd)

    def measure(self) -> None:
        best: tuple[int, int, int] | None = None
        for _ in range(_SAMPLES):
            before = self._read_system()
            phc = self._read_phc()
            after = self._read_system()
            if best is None or after - before < best[0]:
                best = (after - before, phc, (before + after) // 2)
        assert best is not None
        span, phc, system = best
        offset, drift = phc - system, 0.0
        last = self._model
        if last is not None and phc - last[1] > 100_000_000:
            drift = (offset - last[0]) / (phc - last[1])
            if abs(drift) > _MAX_DRIFT:  # (a step of either clock: start the model afresh)
                drift = 0.0
        self._model, self.span_ns = (offset, phc, drift), span

    def to_system(self, phc_ns: int) -> int:
        """A time read by the PHC, as the system clock would have read it; 0 before any measurement."""
        model = self._model
        if model is None:
            return 0
        offset, at, drift = model
        return phc_ns - offset - int(drift * (phc_ns - at))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def enable(names: tuple[str, ...]) -> PhcClock | None:
    """Switch on hardware timestamping on the interfaces named ("*": all that have it); the clock
    to convert their timestamps with, or None (everything logged: software timestamps then)."""
    if not names:
        return None
    every = "*" in names
    wanted = [name for _, name in socket.if_nameindex()] if every else list(dict.fromkeys(names))
    clock: PhcClock | None = None
    used = []
    for name in wanted:
        try:
            info = ts_info(name)
        except OSError as exc:
            if not every:
                log.warning("ntp.hwtimestamp: %s: %s; software timestamps there", name, exc.strerror or exc)
            continue
        why = info.lacks()
        if why:
            if not every:
                log.warning("ntp.hwtimestamp: %s: %s; software timestamps there", name, why)
            continue
        if clock is not None and info.phc_index != clock.index:
            log.warning("ntp.hwtimestamp: %s has its own PTP clock (/dev/ptp%d): only /dev/ptp%d's interfaces "
                        "get hardware timestamps", name, info.phc_index, clock.index)  # fmt: skip
            continue
        try:
            switch_on(name, info)
            if clock is None:
                clock = PhcClock.open(info.phc_index)
                clock.measure()
        except OSError as exc:
            log.warning("ntp.hwtimestamp: cannot switch on hardware timestamps on %s: %s; software timestamps "
                        "there", name, exc.strerror or exc)  # fmt: skip
            continue
        used.append(name)
    if clock is None:
        log.warning("ntp.hwtimestamp: no interface gets hardware timestamps; software timestamps are used")
        return None
    log.info("hardware timestamps on %s (PTP clock /dev/ptp%d, read within %d ns of the system clock)",
             ", ".join(used), clock.index, clock.span_ns)  # fmt: skip
    return clock
