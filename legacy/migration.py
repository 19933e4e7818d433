"""Who still uses legacy keys: a bounded per-client ledger for the move to NTS.

Strategy: one entry per (client address, key id): algorithm, first and last seen, request count,
updated under a lock (several listener threads may record at once). The table is bounded: when
full, the half least recently seen is dropped in one pass. Totals per (algorithm, key id) are kept
apart and never dropped, so metrics stay monotonic while the ledger forgets idle clients.
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
        self._entries: dict[tuple[str, int], list[Any]] = {}  # [algorithm, first_ns, last_ns, count]
        self.totals: dict[tuple[str, str], int] = {}  # (algorithm label, key id) -> requests

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
            if entry is None:
                if len(self._entries) >= self.max_clients:
                    self._forget_idle_half()
                self._entries[k] = [algorithm, now_ns, now_ns, 1]
            else:
                entry[0], entry[2], entry[3] = algorithm, now_ns, entry[3] + 1
            self.totals[total_key] = self.totals.get(total_key, 0) + 1

    def _forget_idle_half(self) -> None:
        by_last = sorted(self._entries.items(), key=lambda item: item[1][2])
        self._entries = dict(by_last[len(by_last) // 2 :])

    def report(self) -> list[dict[str, Any]]:
        """Entries, most recently seen first, as JSON-ready dicts."""
        with self._lock:
            items = [(k, list(v)) for k, v in self._entries.items()]
        items.sort(key=lambda item: item[1][2], reverse=True)
        return [
            {
                "client": client,
                "key_id": key_id,
                "algorithm": alg.label,
                "deprecated": alg.deprecated,
                "first_seen": _iso(first),
                "last_seen": _iso(last),
                "requests": count,
            }
            for (client, key_id), (alg, first, last, count) in items
        ]


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
