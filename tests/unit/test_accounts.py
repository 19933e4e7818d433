"""The bound on Timeroast sweeps: distinct machine accounts per address, and the budget for new ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mssntp.accounts import NEW_BUDGET, PER_CLIENT, AccountGuard, AccountLimits

S = 10**9


def test_one_address_gets_a_few_accounts_per_window_then_none() -> None:
    """Seen on main: one address had 29 distinct RIDs signed in 22 s. Now 4 per hour."""
    guard = AccountGuard(AccountLimits(per_client=4, window=3600))
    outcomes = [guard.check("10.0.0.9", 1000 + rid, rid * S) for rid in range(29)]
    assert outcomes == [None] * 4 + [PER_CLIENT] * 25
    assert guard.check("10.0.0.9", 1001, 30 * S) is None  # its own accounts still signed
    assert guard.check("10.0.0.9", 1001 | 0x80000000, 30 * S) is None  # (either key selector: the same RID)
    assert guard.check("10.0.0.10", 5000, 30 * S) is None  # another address has its own allowance
    assert guard.check("10.0.0.9", 2000, 3601 * S) is None  # a new window


def test_accounts_no_one_asked_for_recently_come_from_one_budget() -> None:
    """A sweep from many addresses: one new account each, limited all together; known ones are not."""
    guard = AccountGuard(AccountLimits(new_rate=2, new_burst=10))
    outcomes = [guard.check(f"10.1.{i // 250}.{i % 250}", 7000 + i, 0) for i in range(30)]
    assert outcomes == [None] * 10 + [NEW_BUDGET] * 20
    assert guard.check("10.9.9.9", 7003, 0) is None  # asked for before: not new, costs nothing
    assert guard.check("10.9.9.8", 9999, 1 * S) is None  # two more a second
    assert guard.check("10.9.9.7", 9998, 1 * S) is None
    assert guard.check("10.9.9.6", 9997, 1 * S) == NEW_BUDGET


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 2**32 - 1), st.integers(0, 10**12)), max_size=300))
def test_no_address_exceeds_its_allowance_nor_the_sweep_its_budget(requests: list[tuple[int, int, int]]) -> None:
    limits = AccountLimits(per_client=3, window=10**6, new_rate=2, new_burst=5, max_clients=1000)
    guard = AccountGuard(limits)
    granted: dict[str, set[int]] = {}
    new: set[int] = set()
    last = 0
    for host, key_id, now in sorted(requests, key=lambda r: r[2]):
        ip, rid = f"10.0.0.{host}", key_id & 0x7FFFFFFF
        if guard.check(ip, key_id, now) is None:
            granted.setdefault(ip, set()).add(rid)
            new.add(rid)
        last = now
    assert all(len(rids) <= limits.per_client for rids in granted.values())
    assert len(new) <= limits.new_burst + limits.new_rate * last / S
