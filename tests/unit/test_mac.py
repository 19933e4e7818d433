"""MAC authentication through the pipeline, checked against MACs computed independently here."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import struct
import time
from pathlib import Path

import pytest

from legacy.keyfile import Algorithm
from legacy.mac import MacPlugin, MacSettings
from legacy.migration import ClientLedger
from nts.core.clockstate import ClockSettings, server_state
from nts.core.pipeline import Pipeline
from nts.core.plain import PlainHandler
from nts.core.policy import NetworkSet
from nts.wire.packet import parse_packet
from tests.helpers import async_wait_until, client_request
from tests.mac_helpers import independent_mac

KEYS = {
    1: ("MD5", b"md5-secret-1234", "md5"),
    2: ("SHA1", bytes(range(20)), "sha1"),
    3: ("SHA256", bytes(range(1, 21)), "sha256"),
    4: ("AES128CMAC", bytes(range(16)), "cmac"),
    5: ("SHA512", bytes(range(2, 22)), "sha512"),
    6: ("AES-256", bytes(range(32)), "cmac"),
}


@pytest.fixture
def mac(tmp_path: Path) -> MacPlugin:
    lines = [f"{i} {t} {k.hex()}" if len(k) * 2 > 20 else f"{i} {t} {k.decode()}" for i, (t, k, _) in KEYS.items()]
    path = tmp_path / "ntp.keys"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return MacPlugin(MacSettings(keys=path, trusted=frozenset({1, 2, 3, 4, 5, 6})))


def pipeline(mac: MacPlugin) -> Pipeline:
    state = server_state(ClockSettings(local_reference=True, stratum=1, reference_id=b"LOCL"), None, -20, 0)
    return Pipeline(state=state, authenticators=[mac, PlainHandler()], clock=time.time_ns)


def signed(version: int, key_id: int, length: int | None = None) -> bytes:
    _, key, algo = KEYS[key_id]
    n = length or (16 if algo in ("md5", "cmac") else 20)
    req = client_request(version=version)
    return req + struct.pack(">I", key_id) + independent_mac(algo, key, req, n)


@pytest.mark.parametrize(("key_id", "version", "length"), [
    (1, 4, 16), (2, 4, 20), (3, 4, 20), (4, 4, 16), (5, 4, 20), (6, 4, 16),  # NTPv4: truncated to 20
    (3, 3, 32), (5, 3, 64),  # chrony: full digests in NTPv3
    (3, 4, 32),  # ntpdig: a full SHA-256 digest in NTPv4
])  # fmt: skip
def test_valid_mac_gets_a_signed_time_reply(mac: MacPlugin, key_id: int, version: int, length: int) -> None:
    p = pipeline(mac)
    request = signed(version, key_id, length)
    reply = p.handle(request, ("192.0.2.5", 123), time.time_ns())
    assert isinstance(reply, bytes) and len(reply) == len(request)
    header = reply[:48]
    assert parse_packet(header).header.stratum == 1
    assert reply[48:52] == struct.pack(">I", key_id)
    _, key, algo = KEYS[key_id]
    assert reply[52:] == independent_mac(algo, key, header, length)
    assert p.counters()[("replies", "mac")] == 1


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda r: r[:-1] + bytes([r[-1] ^ 1]), "bad_mac"),
    (lambda r: r[:48] + struct.pack(">I", 99) + r[52:], "unknown_key"),
    (lambda r: r[:20] + b"X" + r[21:], "bad_mac"),  # header changed after signing
])  # fmt: skip
def test_failures_get_a_crypto_nak_without_time(mac: MacPlugin, mutate: object, reason: str) -> None:
    p = pipeline(mac)
    request = signed(4, 2)
    reply = p.handle(mutate(request), ("192.0.2.5", 123), time.time_ns())  # type: ignore[operator]
    assert isinstance(reply, bytes) and len(reply) == 52
    h = parse_packet(reply).header
    assert (h.stratum, h.leap, h.receive_ts, h.transmit_ts) == (0, 3, 0, 0)
    assert h.origin_ts == int.from_bytes(request[40:48], "big")
    assert reply[48:] == bytes(4)
    assert p.counters()[("naks", "mac", reason)] == 1


def test_untrusted_and_wrong_length_and_network(mac: MacPlugin) -> None:
    from legacy.mac import _Table

    mac.table = _Table(mac.table.keys, frozenset({1, 2, 3}), {2: NetworkSet([ipaddress.ip_network("10.0.0.0/8")])})
    p = pipeline(mac)
    assert p.handle(signed(4, 4), ("192.0.2.5", 1), time.time_ns())[48:] == bytes(4)  # type: ignore[index]
    md5_as_sha1 = signed(4, 1)[:52] + bytes(20)
    assert len(p.handle(md5_as_sha1, ("192.0.2.5", 1), time.time_ns())) == 52  # type: ignore[arg-type]
    assert p.handle(signed(4, 2), ("192.0.2.5", 1), time.time_ns())[48:] == bytes(4)  # type: ignore[index]
    ok = p.handle(signed(4, 2), ("10.1.2.3", 1), time.time_ns())
    assert isinstance(ok, bytes) and ok[48:52] == struct.pack(">I", 2)
    counts = p.counters()
    assert counts[("naks", "mac", "untrusted_key")] == 1
    assert counts[("naks", "mac", "wrong_mac_length")] == 1
    assert counts[("naks", "mac", "key_not_allowed_for_client")] == 1


def test_ledger_accounts_and_stays_bounded() -> None:
    ledger = ClientLedger(max_clients=100)
    for i in range(1000):
        ledger.record(f"10.0.{i // 256}.{i % 256}", 1, Algorithm.MD5, 10**18 + i)
        assert len(ledger) <= 100
    ledger.record("10.0.3.231", 1, Algorithm.MD5, 10**18 + 2000)
    rows = ledger.report()
    assert rows[0]["client"] == "10.0.3.231" and rows[0]["requests"] == 2 and rows[0]["deprecated"] is True
    assert ledger.totals == {("MD5", "1"): 1001}


def test_refused_stragglers_are_remembered_within_the_same_bound() -> None:
    """Clients refused for their key (spoofable: any source, any key id) are listed, and bounded."""
    ledger = ClientLedger(max_clients=100)
    for i in range(1000):
        ledger.refuse(f"10.1.{i // 256}.{i % 256}", 50 + i, "unknown_key", 10**18 + i)
    ledger.refuse("10.1.3.231", 1049, "untrusted_key", 10**18 + 2000)
    rows = ledger.report()
    assert len(rows) <= 100
    assert rows[0] == {"client": "10.1.3.231", "key_id": 1049, "algorithm": "", "deprecated": False,
                       "first_seen": rows[0]["first_seen"], "last_seen": rows[0]["last_seen"], "requests": 2,
                       "refused": "untrusted_key"}  # fmt: skip
    assert ledger.totals == {} and len(ledger) == 0  # served clients' figures are apart


def test_ledger_counts_a_key_id_apart_when_its_algorithm_changes() -> None:
    """A key file may reuse an id for a new algorithm: the totals keep both, the client row shows the new."""
    ledger = ClientLedger()
    for _ in range(3):
        ledger.record("192.0.2.1", 7, Algorithm.MD5, 10**18)
    ledger.record("192.0.2.1", 7, Algorithm.AES128CMAC, 10**18 + 5)
    assert ledger.totals == {("MD5", "7"): 3, ("AES-128-CMAC", "7"): 1}
    (row,) = ledger.report()
    assert row["algorithm"] == "AES-128-CMAC" and row["requests"] == 1 and row["deprecated"] is False


def test_a_key_file_changed_before_the_watcher_starts_is_still_reloaded(
    mac: MacPlugin, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher took its reference when it first ran, after the keys were loaded: a file changed
    in between (at start-up, under load) was never reloaded. Now the reference is the file as read."""
    mac.settings = dataclasses.replace(mac.settings, check_interval=0.1)
    mac.settings.keys.write_text("1 MD5 onlyone\n")  # after loading, before start()

    async def run() -> set[int]:
        await mac.start()
        try:
            with contextlib.suppress(AssertionError):  # unchanged after 5 s: the assertion below says so
                await async_wait_until(lambda: set(mac.table.keys) != set(KEYS), 5, 0.05)
            return set(mac.table.keys)
        finally:
            await mac.stop()

    assert asyncio.run(run()) == {1}
    mac.settings.keys.write_text("this is not a key line\n")
    mac.check_file()  # broken: the keys stay, and it is reported once per change, not at every check
    mac.check_file()
    assert set(mac.table.keys) == {1}
    assert sum("the key file changed, but it cannot be used" in r.getMessage() for r in caplog.records) == 1
