"""Who still uses legacy keys: a bounded per-client ledger for the move to NTS.

Strategy: one entry per (client address, key id): algorithm, first and last seen, request count,
updated under a lock (several listener threads may record at once). The table is bounded: when
full, the half least recently seen is dropped in one pass, and the counts of what it drops are
added to per-(algorithm, key id) totals of forgotten requests. `totals` (forgotten plus live
entries) is summed when asked for, not per request, and stays monotonic while the ledger forgets
idle clients.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any

from .keyfile import Algorithm


class ClientLedger:
    def __init__(self, max_clients: int = 10_000) -> None:
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], list[Any]] = {}  # [algorithm, first_ns, last_ns, count, total key]
        self._forgotten: dict[tuple[str, str], int] = {}  # (algorithm label, key id) -> requests
        self._refused: dict[tuple[str, int], list[Any]] = {}  # [reason, first_ns, last_ns, count]

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self, client: str, key_id: int, algorithm: Algorithm, now_ns: int, total_key: tuple[str, str] | None = None
    ) -> None:
        """Note one authenticated request. `total_key` is (algorithm label, key id as text); callers
        on the hot path pass it precomputed."""
        k = (client, key_id)
        if total_key is None:
            total_key = (algorithm.label, str(key_id))
        with self._lock:
            entry = self._entries.get(k)
            if entry is not None and entry[4] == total_key:  # the same key as before: the common case
                entry[2] = now_ns
                entry[3] += 1
                return
            if entry is None:
                if len(self._entries) >= self.max_clients:
                    self._forget_idle_half()
                self._entries[k] = [algorithm, now_ns, now_ns, 1, total_key]
            else:  # the key id now names another algorithm (the key file changed): count apart
                self._forget(entry)
                self._entries[k] = [algorithm, entry[1], now_ns, 1, total_key]

    def refuse(self, client: str, key_id: int, reason: str, now_ns: int) -> None:
        """Note a request refused for its key (unknown, untrusted, not for this client): a client
        still set up with a key the server no longer serves it, to find before it loses its time."""
        k = (client, key_id)
        with self._lock:
            entry = self._refused.get(k)
            if entry is not None:
                entry[0], entry[2], entry[3] = reason, now_ns, entry[3] + 1
                return
            if len(self._refused) >= self.max_clients:  # spoofable: bounded, the idle half goes
                by_last = sorted(self._refused.items(), key=lambda item: item[1][2])
                self._refused = dict(by_last[len(by_last) // 2 :])
            self._refused[k] = [reason, now_ns, now_ns, 1]

    def _forget(self, entry: list[Any]) -> None:
        self._forgotten[entry[4]] = self._forgotten.get(entry[4], 0) + entry[3]

    def _forget_idle_half(self) -> None:
        by_last = sorted(self._entries.items(), key=lambda item: item[1][2])
        for _, entry in by_last[: len(by_last) // 2]:
            self._forget(entry)
        self._entries = dict(by_last[len(by_last) // 2 :])

    @property
    def totals(self) -> dict[tuple[str, str], int]:
        """Requests per (algorithm label, key id) since start: forgotten entries plus live ones."""
        with self._lock:
            out = dict(self._forgotten)
            for entry in self._entries.values():
                out[entry[4]] = out.get(entry[4], 0) + entry[3]
        return out

    def report(self) -> list[dict[str, Any]]:
        """Entries, most recently seen first, as JSON-ready dicts: the clients served (`refused`
        empty), then those refused for their key (`refused`: why; algorithm unknown)."""
        with self._lock:
            items = [(k, v[:4]) for k, v in self._entries.items()]
            refused = [(k, list(v)) for k, v in self._refused.items()]
        items.sort(key=lambda item: item[1][2], reverse=True)
        refused.sort(key=lambda item: item[1][2], reverse=True)
        served = [
            {
                "client": client,
                "key_id": key_id,
                "algorithm": alg.label,
                "deprecated": alg.deprecated,
                "first_seen": _iso(first),
                "last_seen": _iso(last),
                "requests": count,
                "refused": "",
            }
            for (client, key_id), (alg, first, last, count) in items
        ]
        return served + [
            {
                "client": client,
                "key_id": key_id,
                "algorithm": "",
                "deprecated": False,
                "first_seen": _iso(first),
                "last_seen": _iso(last),
                "requests": count,
                "refused": reason,
            }
            for (client, key_id), (reason, first, last, count) in refused
        ]


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
