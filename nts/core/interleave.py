"""Interleaved mode (RFC 9769 section 2) and the transmit-time correction, the server's side, sans-IO.

Strategy, as chrony's server does it: every reply's receive timestamp goes out with its lowest bit
set and its transmit timestamp with it clear, so a request whose origin timestamp has that bit set
copied one of our receive timestamps (a client in interleaved mode) and only those cost a lookup;
a basic client (origin zero, or our transmit timestamp) costs one bit test. `TxTimestamps` maps
such a receive timestamp, as sent, to the client it went to and when that reply left: the time read
just before the send, then the kernel's transmit timestamp once the shell has read it from the
socket's error queue. A request naming an entry made for its own address gets the interleaved
reply (origin: its receive field; transmit: when our previous reply really left), and the entry is
used up; anything else gets a basic reply. The table is bounded (the oldest entries go), so a
flood cannot grow it, and an address can only use entries made for it.

Basic replies carry a transmit timestamp read before the reply is finished and sent, so they are
early by the time to the kernel's timestamp. `TxLag` keeps a robust running estimate of that lag
(medians of recent samples, each the kernel's time minus the time written) that the reply builder
adds to the clock. That lag depends on how warm the server is (`cold`, set by the shell for each
request): after a pause of a millisecond or more the way to the wire is slow (10-30 us here) and a
reply is corrected by the lag measured after pauses (`cold_lag`); under load it is quick (1-2 us),
and the samples of that lag swing with the load between 1 and 35 us, so applying them moved the
time served by more than they corrected: warm replies are measured, not corrected.

How long a cold send takes also depends on how fast the machine runs at that moment, which on a
virtual machine changes from one request to the next (here one request in six ran 1.4 times
faster, its lag 14 us against 21). The shell times something that walks the same way just before
the clock is read (its probe, see server/udp.py) and hands that `pace` in; each sample is kept with
the pace of its request, and a reply is corrected by the median lag of the samples whose pace was
nearest its own (`TxLag.expect`). Where the pace says nothing, that is the median of a few nearby
samples instead of all: the same estimate, a little noisier.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections import deque
from operator import itemgetter
from statistics import median

MAX_ENTRIES = 65536  # interleaved-mode entries kept (memory: ~150 bytes each)
_LAG_WINDOW = 127  # samples the lag estimate is the median of
_NEAREST = 15  # samples of the nearest paces a paced estimate is the median of
_LAG_MAX_NS = 5_000_000  # a sample above this is not a send's lag (a stall, a wrong match): ignored


class TxLag:
    """The running estimate of how much later than its transmit timestamp a reply leaves (ns): all
    samples' median (`ns`), and by pace (`expect`)."""

    __slots__ = ("_count", "_lags", "_paces", "enabled", "ns", "paces", "samples")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # False: measured (metrics) but not added to replies
        self.ns = 0  # what the reply builder adds to the clock (no pace known)
        self.samples: deque[int] = deque(maxlen=_LAG_WINDOW)
        self.paces: deque[int] = deque(maxlen=_LAG_WINDOW)  # each sample's pace (0: none)
        self._paces: list[int] = []  # the samples' paces in order, and their lags in that order
        self._lags: list[int] = []
        self._count = 0

    def sample(self, lag_ns: int, pace_ns: int = 0) -> bool:
        """Take one measurement (kernel transmit time minus the time the reply was stamped with,
        before any correction), made at `pace_ns` (see the module's comment); False when it is not
        plausible and was ignored."""
        if not 0 <= lag_ns <= _LAG_MAX_NS:
            return False
        self.samples.append(lag_ns)
        self.paces.append(pace_ns)
        self._count += 1
        # every 8th sample (a median of 127 costs ~8 us); none before 8 are in: the first replies
        # after a start carry its one-time costs (60 us and more), which one or two would pass on
        if self._count % 8 == 0 and self.enabled:
            self._estimate()
        return True

    def _estimate(self) -> None:
        self.ns = int(median(self.samples)) if self.samples else 0
        ordered = sorted(zip(self.paces, self.samples, strict=True), key=itemgetter(0))
        self._paces = [pace for pace, _ in ordered]
        self._lags = [lag for _, lag in ordered]

    def expect(self, pace_ns: int) -> int:
        """What a reply made at `pace_ns` is to be corrected by: the median lag of the samples with
        the nearest paces (all samples' median until there are enough, or with no pace (0); 0 when
        not enabled)."""
        lags = self._lags
        if len(lags) < 2 * _NEAREST or not pace_ns or not self.enabled:
            return self.ns if self.enabled else 0
        paces = self._paces
        middle = (bisect_left(paces, pace_ns) + bisect_right(paces, pace_ns)) // 2  # (ties: their middle)
        start = min(max(middle - _NEAREST // 2, 0), len(lags) - _NEAREST)
        return sorted(lags[start : start + _NEAREST])[_NEAREST // 2]

    def enable(self, on: bool) -> None:
        """Add the estimate to replies (from the samples so far), or measure only."""
        self.enabled = on
        self.ns, self._paces, self._lags = 0, [], []
        if on and self._count >= 8:
            self._estimate()

    @property
    def estimate_ns(self) -> int:
        """The current estimate, applied or not."""
        return int(median(self.samples)) if self.samples else 0


class TxTimestamps:
    """Receive timestamp as sent (NTP 64-bit, lowest bit set) -> [client address, transmit time in
    ns, whether the kernel gave it], for one socket's replies. Written by its listener's thread only
    (`thread`); `pending` hands the shell the entry the last reply built made, to time its send."""

    __slots__ = ("cold", "cold_lag", "cold_ns", "daemon_served", "entries", "interleaved", "kernel_stamps", "lag",
                 "max_entries", "pace", "pending", "thread", "unhurried", "unmatched")  # fmt: skip

    def __init__(self, max_entries: int = MAX_ENTRIES, lag: TxLag | None = None, cold_lag: TxLag | None = None) -> None:
        self.entries: dict[int, list[object]] = {}
        self.max_entries = max_entries
        self.lag = lag if lag is not None else TxLag(enabled=False)  # a warm server's: measured only
        self.cold_lag = cold_lag if cold_lag is not None else TxLag()  # after a pause: added to replies
        self.cold = False  # the request being answered came after a pause (set by the shell: `after_pause`)
        self.cold_ns = 0  # then what its reply is corrected by
        self.pace = 0  # and the pace it was answered at
        self.pending: tuple[int, int] | None = None  # (receive key, time read before the send)
        # the reply `pending` is for carries no time read before its send (interleaved: its transmit
        # time is an earlier reply's, known), so it may wait for the rest of its batch's send call
        self.unhurried = False
        self.thread = threading.get_ident()  # the listener's thread (set again when it starts)
        self.interleaved = 0  # replies sent in interleaved mode
        self.unmatched = 0  # interleaved-looking requests answered in basic mode (no usable entry)
        self.kernel_stamps = 0  # transmit timestamps the kernel gave
        self.daemon_served = 0  # interleaved replies that had only the daemon's time (no kernel's yet)

    def after_pause(self, pace_ns: int) -> None:
        """The request being answered came after a pause, and the shell's walk to the wire before
        the clock is read took `pace_ns` (a request that does not is answered with `cold` False)."""
        self.cold = True
        self.pace = pace_ns
        self.cold_ns = self.cold_lag.expect(pace_ns)

    def kernel(self, key: int, tx_ns: int) -> bool:
        """The kernel's transmit timestamp of the reply noted under `key`, when it still is (True)."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        entry[1], entry[2] = tx_ns, True
        self.kernel_stamps += 1
        return True

    def exchange(self, quoted: int, key: int, client: str, tx_ns: int) -> int | None:
        """An interleaved-looking request from `client` quoting `quoted`: the transmit time of the
        reply with that receive timestamp when it went to `client` (the entry is used up: one
        interleaved reply per exchange), else None; and its own reply, receive timestamp `key`,
        noted as going to `client` now (`tx_ns`, the daemon's time) for the next one."""
        entries = self.entries
        entry = entries.get(quoted)
        if entry is None or entry[0] != client:
            self.unmatched += 1
            earlier = None
        else:
            del entries[quoted]
            self.interleaved += 1
            if not entry[2]:
                self.daemon_served += 1
            earlier = entry[1]
        if len(entries) >= self.max_entries:
            del entries[next(iter(entries))]  # the oldest (insertion order)
        entries[key] = [client, tx_ns, False]
        self.pending = (key, tx_ns)
        self.unhurried = earlier is not None
        return earlier  # type: ignore[return-value]
