"""Reading the kernel clock's state (adjtimex) and the precision of reading the clock.

Strategy: adjtimex(2) with modes 0 only reads; it tells whether something disciplines the clock
(STA_UNSYNC clear) and its error estimates. Non-Linux systems or a failing call give None, which the
core treats as unsynchronised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time

from ..core.clockstate import KernelClock


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _adjtimex = _libc.adjtimex
except (OSError, AttributeError):
    _libc = None


def read_kernel_clock() -> KernelClock | None:
    if _libc is None:
        return None
    tx = _Timex()
    state = _adjtimex(ctypes.byref(tx))
    if state < 0:
        return None
    return KernelClock(state, tx.status, tx.maxerror, tx.esterror)


def measure_precision(samples: int = 2000) -> int:
    """log2 of the smallest step seen between clock readings (RFC 5905 'precision')."""
    step = 1 << 62
    read = time.time_ns
    last = read()
    for _ in range(samples):
        now = read()
        if now > last:
            step = min(step, now - last)
        last = now
    step = max(step, 1)
    return max(-32, min(0, math.ceil(math.log2(step / 1e9))))
