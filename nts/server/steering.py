"""Each client address to one worker: a classic BPF program for the workers' SO_REUSEPORT group.

Strategy: the kernel spreads a reuseport group's datagrams by a hash of the 4-tuple, so a client
that changes its source port reaches every worker, and the per-client limits each worker keeps
(the NTP rate limit and its KoDs, DENY/RSTR KoDs, MS-SNTP's rate and machine accounts) multiplied
by the workers: with 4 workers one address got 34 signed MS-SNTP replies in a burst against 9 from
one process. A cBPF program (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5+) picks the socket from the
source address instead: its last 32 bits modulo the group's size, read at the network header
(SKF_NET_OFF) whatever the transport. Sockets join the group in the order they are bound, worker i's
being index i, and attaching the program to one socket sets it for the group. Where the kernel
refuses it, the group stays hashed and the log says so (limits are then per worker).
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = the 32 bits at k
_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K: A %= k
_RET_A = 0x16  # BPF_RET | BPF_A: return A (the socket's index in the group)
_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def source_program(family: int, groups: int) -> bytes:
    """The cBPF instructions: load the source address's last 32 bits, modulo `groups`, return."""
    last_word = 12 if family == socket.AF_INET else 8 + 12  # IPv4 source at 12; IPv6 source at 8..24
    return b"".join(
        (
            _FILTER.pack(_LD_W_ABS, 0, 0, (_SKF_NET_OFF + last_word) & 0xFFFFFFFF),
            _FILTER.pack(_MOD_K, 0, 0, groups),
            _FILTER.pack(_RET_A, 0, 0, 0),
        )
    )


def steer_by_source(sock: socket.socket, groups: int) -> None:
    """Attach the program to `sock`'s reuseport group of `groups` sockets (OSError if refused)."""
    program = source_program(sock.family, groups)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // _FILTER.size, ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
