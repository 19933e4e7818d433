"""The rate limiter (GCRA) holds its promise for any request pattern, and a clock step only ever
frees a client, never locks it out."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nts.core.policy import RATE_OK, RateLimiter, RateSettings

settings_st = st.builds(
    RateSettings, rate=st.sampled_from([0.5, 1.0, 2.0, 64.0]), burst=st.integers(1, 20), kod=st.just(True)
)
gaps = st.lists(st.integers(0, 3 * 10**9), min_size=1, max_size=200)  # ns between requests


@given(settings_st, gaps)
def test_accepted_requests_never_exceed_burst_plus_rate(settings: RateSettings, deltas: list[int]) -> None:
    limiter = RateLimiter(settings)
    interval = int(1e9 / settings.rate)
    now, accepted = 10**18, []
    for d in deltas:
        now += d
        if limiter.check("a", now) == RATE_OK:
            accepted.append(now)
    for i, first in enumerate(accepted):  # in any window, at most burst + what the rate earned
        for j in range(i, len(accepted)):
            assert j - i + 1 <= settings.burst + (accepted[j] - first) // interval + 1


@given(settings_st, gaps, st.integers(1, 10**13))
def test_a_step_back_never_locks_a_client_out(settings: RateSettings, deltas: list[int], step: int) -> None:
    limiter = RateLimiter(settings)
    now = 10**18
    for d in deltas:  # any history, then the clock goes back by any amount
        now += d
        limiter.check("a", now)
    assert limiter.check("a", now - step) == RATE_OK or step <= limiter_window(settings)


def limiter_window(settings: RateSettings) -> int:
    """How far ahead of the clock a client's state can legitimately be: a step smaller than this may
    still find the client inside its burst, which is the limiter doing its job."""
    interval = int(1e9 / settings.rate)
    return interval * settings.burst
