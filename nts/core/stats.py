"""The stats sink: counters the shell hands to the core, and what the core's counters mean.

Strategy: counters are a flat dict keyed by (metric, label values...) tuples, cheap enough for the
per-packet path, so a snapshot can be summed across threads and worker processes and rendered as
Prometheus text. The shell makes one `Counters` per writer (a listener thread, the event loop) and
hands it to the pipeline it builds, as ntpd-rs's server takes a stats handler; the core only ever
increments what it was given. Each owner of counters describes its own (`CORE_COUNTERS` here, the
shell's and each plugin's beside them); the metrics endpoint merges the descriptions it is given.
"""

from __future__ import annotations

from collections.abc import Mapping

Key = tuple[str, ...]
# metric -> (label names, help text); gauge -> help text
CounterHelp = Mapping[str, tuple[tuple[str, ...], str]]
GaugeHelp = Mapping[str, str]
# counter -> the label values of series present (at zero) from the start: an alert on the rate of a
# series that appears only at its first event never fires for that event
SeriesHelp = Mapping[str, tuple[tuple[str, ...], ...]]


class Tally:
    """One counter as a plain int, for the hottest keys (`tally.n += 1` costs half a dict update)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Counters:
    """Counters keyed by (metric, label...). One writer per instance (reads may come from anywhere)."""

    __slots__ = ("_tallies", "counts")

    def __init__(self) -> None:
        self.counts: dict[Key, int] = {}
        self._tallies: dict[Key, Tally] = {}

    def inc(self, key: Key, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def tally(self, key: Key) -> Tally:
        """The Tally that counts `key` in this sink (made on first use)."""
        found = self._tallies.get(key)
        if found is None:
            found = self._tallies[key] = Tally()
        return found

    def snapshot(self) -> dict[Key, int]:
        """A copy, safe to take from another thread (nothing is reset)."""
        merged = dict(tuple(self.counts.items()))
        for key, tally in tuple(self._tallies.items()):
            if tally.n:
                merged[key] = merged.get(key, 0) + tally.n
        return merged


def add(total: dict[Key, int], more: Mapping[Key, int]) -> None:
    """Sum `more` into `total`."""
    for key, value in tuple(more.items()):
        total[key] = total.get(key, 0) + value


CORE_COUNTERS: CounterHelp = {
    "requests": ((), "Datagrams received on NTP sockets."),
    "replies": (("auth",), "Time replies sent, by authentication mode."),
    "drops": (("reason",), "Datagrams not answered with time, by reason."),
    "kod": (("code",), "Kiss-o'-Death replies sent, by kiss code."),
    "naks": (("auth", "reason"), "Negative authentication replies sent (crypto-NAK, NTS NAK)."),
    "deferred": (("auth",), "Replies handed to an asynchronous signer."),
}

CORE_SERIES: SeriesHelp = {
    "requests": ((),),
    "replies": (("none",),),
    "kod": (("DENY",), ("RSTR",), ("RATE",)),
}

CORE_GAUGES: GaugeHelp = {
    "leap": "Leap indicator served: 0 none, 1 insert, 2 delete, 3 unsynchronised.",
    "stratum": "Stratum served (16: unsynchronised).",
    "rate_limit_clients": "Addresses in the NTP rate limiter's table (bounded by rate_limit.max_clients).",
}
