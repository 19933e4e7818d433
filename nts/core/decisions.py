"""What the core decides for a datagram: a closed set of typed results.

Strategy: the hot path must not allocate more than it has to, so a time reply is plain `bytes`;
drops are preallocated `Drop` singletons (one per reason). A handler answers with an `Answer`:
bytes, a `Nak` (a negative reply it wants sent: crypto-NAK, NTS NAK), a `Drop`, a `Defer` (the
reply is finished asynchronously, as MS-SNTP's signing by Samba) or a `Seal` (a verified request
whose reply is finished when it is sent, so its transmit timestamp is read as late as possible).
The pipeline turns every Answer into a `Decision` in one place (`Pipeline._finish`): bytes to send,
a Drop, a Defer, or a Seal that the shell completes right before its send call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .stats import Counters


@dataclass(frozen=True, slots=True)
class Drop:
    """No reply. `reason` is a stable metrics label."""

    reason: str


@dataclass(frozen=True, slots=True)
class Nak:
    """A negative reply a handler wants sent (counted apart from time replies)."""

    data: bytes
    reason: str


Done = Callable[["bytes | None", str], None]  # a deferred reply (None: none, for the reason given)


class Finisher(Protocol):
    """Where deferred replies are finished (MS-SNTP's signer): its own thread, off the serving path."""

    def submit(self, work: Sequence[tuple[Any, Done]]) -> list[Any]:
        """Take (job, done) pairs from a serving thread, without waiting; call each `done` once,
        later, always from the same thread of the finisher's own. Returns the pairs it refused
        (their `done` is never called): the caller counts them. RuntimeError: it has stopped."""
        ...


@dataclass(frozen=True, slots=True)
class Defer:
    """The reply is finished elsewhere: the shell hands `job` to `to` (with the other deferred
    requests of its batch, in one call) and gives what comes back to `Pipeline.check_deferred`."""

    to: Finisher
    job: Any
    name: str  # the handler's, for the counters
    client: tuple[str, int]


class Seal:
    """A request already verified; `complete()` builds the reply (reading the transmit time and
    signing it), guards its length and counts it, without going back through the pipeline.

    A batching shell verifies every request of a batch first and completes the replies just before
    one send call, so no reply waits behind the verification of others. A pipeline object, not a
    wire structure: the pipeline fills in `key` (its counter), `limit` (the request's length) and
    `stats` before the Seal leaves it.
    """

    __slots__ = ("finish", "key", "limit", "stats")

    key: tuple[str, ...]
    limit: int
    stats: Counters

    def __init__(self, finish: Callable[[], bytes]) -> None:
        self.finish = finish

    def complete(self) -> bytes | Drop:
        reply = self.finish()
        counts = self.stats.counts
        if len(reply) > self.limit:
            counts[K_TOO_LONG] = counts.get(K_TOO_LONG, 0) + 1
            return D_TOO_LONG
        counts[self.key] = counts.get(self.key, 0) + 1
        return reply


Answer = bytes | Nak | Drop | Defer | Seal  # what a handler returns
Decision = bytes | Drop | Defer | Seal  # what the pipeline returns to the shell

_drops: dict[str, Drop] = {}


def drop(reason: str) -> Drop:
    """The shared Drop for `reason` (so the hot path allocates nothing to drop)."""
    d = _drops.get(reason)
    if d is None:
        d = _drops[reason] = Drop(reason)
    return d


def drop_reasons() -> list[str]:
    """Every drop reason made so far (those of the modules loaded, made when they were imported)."""
    return sorted(_drops)


D_TOO_LONG = drop("reply_too_long")
K_TOO_LONG = ("drops", D_TOO_LONG.reason)
