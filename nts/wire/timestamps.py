"""NTP time formats (RFC 5905 section 6), era-aware.

Strategy: on the wire a timestamp carries only seconds modulo 2**32 (one era, ~136 years); the era
is recovered by choosing the value closest to a pivot the caller supplies (normally "now"). Internal
time is integer nanoseconds since the Unix epoch, so no float rounding creeps into the hot path.
"""

from __future__ import annotations

NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
ERA_SECONDS = 1 << 32
_NS = 1_000_000_000
MASK64 = (1 << 64) - 1
NTP_SCALED_OFFSET = NTP_UNIX_OFFSET * _NS << 32  # (unix_ns << 32) + this, // 1e9, is the NTP timestamp


def unix_ns_to_ntp64(ns: int) -> int:
    """Unix nanoseconds -> 64-bit NTP timestamp (seconds mod 2**32 . fraction, truncated), in one
    multiply and one divide: this is on every reply's path."""
    return (((ns << 32) + NTP_SCALED_OFFSET) // _NS) & MASK64


def ntp64_to_unix_ns(ts: int, pivot_ns: int) -> int:
    """64-bit NTP timestamp -> Unix nanoseconds, in the era that puts it nearest `pivot_ns`."""
    sec = ts >> 32
    frac_ns = ((ts & 0xFFFFFFFF) * _NS + (1 << 31)) >> 32
    pivot_ntp_sec = pivot_ns // _NS + NTP_UNIX_OFFSET
    era = (pivot_ntp_sec - sec + ERA_SECONDS // 2) // ERA_SECONDS
    return (era * ERA_SECONDS + sec - NTP_UNIX_OFFSET) * _NS + frac_ns


def seconds_to_short(seconds: float) -> int:
    """Seconds -> 32-bit NTP short format (16.16), saturating at the largest value."""
    if seconds <= 0:
        return 0
    return min(int(seconds * 65536 + 0.5), 0xFFFFFFFF)


def short_to_seconds(value: int) -> float:
    """32-bit NTP short format -> seconds."""
    return value / 65536
