"""What the pipeline decides for a datagram, and the counters it reports to.

Strategy: the hot path must not allocate more than it has to, so a time reply is returned as plain
`bytes`; drops are preallocated `Drop` singletons (one per reason); `Nak` is what an authenticator
returns for a negative answer it wants sent (crypto-NAK, NTS NAK); `Defer` hands a job to an
authenticator's asynchronous part (MS-SNTP signing); `Seal` is a verified request whose reply is
finished when it is sent, so its transmit timestamp is read as late as possible. Counters are a
flat dict keyed by label tuples, so a snapshot can be summed across worker processes and rendered
as Prometheus text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .auth import Authenticator


@dataclass(frozen=True, slots=True)
class Drop:
    """No reply. `reason` is a stable metrics label."""

    reason: str


@dataclass(frozen=True, slots=True)
class Nak:
    """A negative reply an authenticator wants sent (counted apart from time replies)."""

    data: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Defer:
    """The reply is finished asynchronously by `authenticator.complete(job)`."""

    authenticator: Authenticator
    job: object
    client: tuple[str, int]


class Seal:
    """A request already verified; `finish()` builds the reply: it reads the transmit time and signs.

    A batching shell verifies every request of a batch first and finishes the replies just before
    one send call, so no reply waits behind the verification of others. A pipeline object, not a
    wire structure: the pipeline fills in `limit` (the request's length) and `key` (its counter).
    """

    __slots__ = ("finish", "key", "limit")

    key: tuple[str, ...]  # set by the pipeline before the Seal leaves it
    limit: int

    def __init__(self, finish: Callable[[], bytes]) -> None:
        self.finish = finish


Decision = bytes | Drop | Defer | Seal

_drops: dict[str, Drop] = {}


def drop(reason: str) -> Drop:
    """The shared Drop for `reason` (so the hot path allocates nothing to drop)."""
    d = _drops.get(reason)
    if d is None:
        d = _drops[reason] = Drop(reason)
    return d


# metric -> (label names, help text), for the metrics endpoint; plugins add theirs with describe().
LABELS: dict[str, tuple[tuple[str, ...], str]] = {
    "requests": ((), "Datagrams received on NTP sockets."),
    "replies": (("auth",), "Time replies sent, by authentication mode."),
    "drops": (("reason",), "Datagrams not answered with time, by reason."),
    "kod": (("code",), "Kiss-o'-Death replies sent, by kiss code."),
    "naks": (("auth", "reason"), "Negative authentication replies sent (crypto-NAK, NTS NAK)."),
    "deferred": (("auth",), "Replies handed to an asynchronous signer."),
    "socket_errors": (("error",), "Errors reported by the NTP sockets."),
    "kernel_drops": (
        (),
        "Datagrams the kernel dropped, receive buffers full (not in requests): more load than served.",
    ),
    "io_calls": (("call",), "Batched listeners' recvmmsg and sendmmsg calls (requests per recvmmsg: the mean batch)."),
    "nts_ke": (("event",), "NTS-KE sessions: connections, outcomes (ok_aead_N, error_*), refusals, timeouts."),
    "log_lines": (("level",), "Log lines written at warning level and above, by level (all processes)."),
    "reloads": (
        ("outcome",),
        "Configuration reloads (SIGHUP): applied, failed (refused, or in part), unconfirmed (a worker too slow).",
    ),
}


# gauge -> help text; plugins add theirs with describe_gauge().
GAUGES: dict[str, str] = {
    "leap": "Leap indicator served: 0 none, 1 insert, 2 delete, 3 unsynchronised.",
    "stratum": "Stratum served (16: unsynchronised).",
    "rate_limit_clients": "Addresses in the NTP rate limiter's table (bounded by rate_limit.max_clients).",
    "uptime_seconds": "Seconds since the server started.",
    "workers": "Worker processes serving NTP.",
    "config_last_reload_successful": "1 when the last reload applied all of the files (or none was made), else 0.",
    "config_last_reload_success_timestamp_seconds": "When the files were last applied in full (start or reload).",
}


def describe(metric: str, labels: tuple[str, ...], help_text: str) -> None:
    """Declare a counter's label names and help text."""
    LABELS.setdefault(metric, (labels, help_text))


def describe_gauge(name: str, help_text: str) -> None:
    """Declare a gauge's help text."""
    GAUGES.setdefault(name, help_text)


class Stats:
    """Counters keyed by (metric, label...). Cheap enough for the per-packet path."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, key: tuple[str, ...], n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
