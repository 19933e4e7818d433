"""Access lists, the rate limiter's bounds, and the clock state."""

from __future__ import annotations

import ipaddress

import pytest

from nts.core.clockstate import STA_UNSYNC, ClockSettings, KernelClock, server_state
from nts.core.policy import (
    ALLOW,
    DENIED,
    RATE_DROP,
    RATE_KOD,
    RATE_OK,
    RESTRICTED,
    AccessPolicy,
    NetworkSet,
    RateLimiter,
    RateSettings,
)
from nts.net import client_key
from nts.wire.packet import Leap


def net(c: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(c)


def test_access_deny_wins_and_allow_restricts() -> None:
    p = AccessPolicy(allow=[net("10.0.0.0/8"), net("2001:db8::/32")], deny=[net("10.9.0.0/16")])
    assert p.check("10.1.1.1") == ALLOW
    assert p.check("10.9.1.1") == DENIED
    assert p.check("192.0.2.1") == RESTRICTED
    assert p.check("2001:db8::5") == ALLOW
    assert p.check("2001:db9::5") == RESTRICTED
    assert p.check("not-an-address") == DENIED
    assert p.check("::ffff:10.1.1.1") == ALLOW  # v4-mapped is judged as IPv4


def test_open_policy_is_skipped() -> None:
    assert AccessPolicy().open
    assert not AccessPolicy(deny=[net("0.0.0.0/0")]).open


def test_network_set_membership() -> None:
    s = NetworkSet([net("fe80::/10")])
    assert "fe80::1%lo" in s
    assert "127.0.0.1" not in s


def test_rate_limiter_burst_then_kod_once_per_interval() -> None:
    r = RateLimiter(RateSettings(rate=10, burst=3, kod=True, kod_interval=1.0))
    now = 10**18
    assert [r.check("a", now) for _ in range(3)] == [RATE_OK] * 3
    assert r.check("a", now) == RATE_KOD
    assert r.check("a", now) == RATE_DROP
    assert r.check("b", now) == RATE_OK  # other clients are unaffected
    assert r.check("a", now + 100_000_000) == RATE_OK  # 0.1 s later: one more earned


def test_rate_limiter_silent_mode() -> None:
    r = RateLimiter(RateSettings(rate=1, burst=1, kod=False))
    assert r.check("a", 0) == RATE_OK
    assert r.check("a", 0) == RATE_DROP


def test_rate_limiter_memory_is_bounded_under_address_spray() -> None:
    r = RateLimiter(RateSettings(rate=1, burst=1, max_clients=1000))
    for i in range(50_000):
        r.check(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", i)
        assert len(r) <= 1000
    assert len(r) >= 500


def test_unsynchronised_kernel_means_alarm() -> None:
    unsynced = KernelClock(state=5, status=STA_UNSYNC, maxerror_us=16_000_000, esterror_us=16_000_000)
    st = server_state(ClockSettings(), unsynced, -20, 0)
    assert (st.leap, st.stratum) == (Leap.ALARM, 16)
    assert server_state(ClockSettings(), None, -20, 0).leap == Leap.ALARM


def test_synchronised_kernel_reports_dispersion_and_leap() -> None:
    synced = KernelClock(state=0, status=0, maxerror_us=250_000, esterror_us=10)
    st = server_state(ClockSettings(stratum=3, reference_id=b"\x0a\0\0\1"), synced, -20, 10**18)
    assert (st.leap, st.stratum, st.reference_id) == (Leap.NONE, 3, b"\x0a\0\0\1")
    assert st.root_dispersion == 0x4000  # 0.25 s in 16.16
    assert st.reference_ts != 0
    inserting = KernelClock(state=1, status=0x10, maxerror_us=1, esterror_us=1)
    assert server_state(ClockSettings(), inserting, -20, 0).leap == Leap.INSERT
    deleting = KernelClock(state=2, status=0x20, maxerror_us=1, esterror_us=1)
    assert server_state(ClockSettings(), deleting, -20, 0).leap == Leap.DELETE


def test_local_reference_serves_even_when_unsynchronised() -> None:
    unsynced = KernelClock(state=5, status=STA_UNSYNC, maxerror_us=1, esterror_us=1)
    st = server_state(ClockSettings(local_reference=True, stratum=1, reference_id=b"LOCL"), unsynced, -20, 0)
    assert (st.leap, st.stratum) == (Leap.NONE, 1)


def test_rate_limiter_survives_the_clock_stepping_back() -> None:
    """Requests carry wall-clock receive times, and a host's clock can be stepped back (at boot, by
    an operator). Before, every client known at the step was limited until the clock had caught up
    with its old state: an hour's step meant an hour of RATE KoDs for all of them."""
    r = RateLimiter(RateSettings(rate=1, burst=2, kod=True, kod_interval=1.0))
    now = 10**18
    assert [r.check("a", now), r.check("a", now)] == [RATE_OK, RATE_OK]
    assert r.check("a", now) == RATE_KOD  # over its burst
    back = now - 3600 * 10**9
    assert r.check("a", back) == RATE_OK  # one hour earlier, as the clock now says: a fresh start
    assert r.check("a", back) == RATE_OK
    assert r.check("a", back) == RATE_KOD  # and still limited by the same rule
    assert r.check("a", back + 10**6) == RATE_DROP  # KoDs still spaced by kod_interval after the step
    assert r.check("b", back) == RATE_OK


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # one /64: one client
        ("fe80::1%eth0", "fe80::/64"),
        ("not an address", "not an address"),
    ],
)
def test_per_client_limits_count_an_ipv6_64_as_one_client(ip: str, key: str) -> None:
    assert client_key(ip) == key
