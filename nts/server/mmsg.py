"""Batched datagram I/O on 64-bit Linux: recvmmsg(2) and sendmmsg(2) through ctypes.

Strategy: Python's socket module has no recvmmsg/sendmmsg, and under load a server pays per
datagram for the syscall, for Python's result tuples and for waking the client once per reply.
`Batch` owns fixed buffers (data, peer address and control message per slot) laid out as the
kernel's `struct mmsghdr` arrays, so one call receives up to `size` datagrams with their kernel
receive timestamps, and one call sends the replies back to the addresses they came from (the
reply reuses the request's raw sockaddr: no address conversion on the way out). Headers are read
and written with `struct` on memoryviews, never through ctypes attribute access, which costs
more than the syscall. Where the layout cannot be verified (other platforms, 32-bit) `available()`
is False and the listener uses plain recvmsg/sendto. On a socket bound to a wildcard address the
kernel also reports the address each datagram was sent to (IP_PKTINFO / IPV6_PKTINFO, after the
timestamp), and each reply carries that control message back, so it leaves from the address the
client asked (a client rejects a reply from another one). With SO_TIMESTAMPING (`timestamping`),
the receive time comes in its control message instead, and a reply can carry a request for its
transmit timestamp.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
import sys
from collections.abc import Callable, Container
from typing import Any

# struct mmsghdr { struct msghdr { name, namelen, iov, iovlen, control, controllen, flags }, len }
_MMSG = struct.Struct("@PIPNPNi4xI4x")
_LENGTHS = struct.Struct("@8xI28xN8xI4x")  # what the kernel writes back: namelen, controllen, msg_len
_PEER = struct.Struct("@PI")  # msg_name, msg_namelen: the start of an mmsghdr
_LENGTH = struct.Struct("@N")  # iov_len, the second half of an iovec; also msg_controllen in an mmsghdr
_CONTROLLEN_AT = 40  # msg_controllen's offset in an mmsghdr (see _LENGTHS)
_IOVEC = struct.Struct("@PN")
_NAME_LEN = 128  # sizeof(struct sockaddr_storage)
_IOVEC_SIZE, _MMSG_SIZE = _IOVEC.size, _MMSG.size  # plain ints for the per-reply path
_CMSG = struct.Struct("@NiiqQ")  # cmsghdr (len, level, type) + struct timespec (SO_TIMESTAMPNS)
_CONTROL_LEN = socket.CMSG_SPACE(16)
_CMSG_TS = struct.Struct("@NiiqQ32x")  # cmsghdr + struct scm_timestamping: software time first (SO_TIMESTAMPING)
_CONTROL_TS_LEN = socket.CMSG_SPACE(48)
SO_TIMESTAMPING = 37  # == SCM_TIMESTAMPING (Linux); absent from the socket module
SOF_TIMESTAMPING_TX_SOFTWARE = 1 << 1
SOF_TIMESTAMPING_TX_HARDWARE = 1 << 0
TS_REQUEST = struct.pack(
    "@NiiI4x", socket.CMSG_LEN(4), socket.SOL_SOCKET, SO_TIMESTAMPING, SOF_TIMESTAMPING_TX_SOFTWARE
)
TS_REQUEST_SPACE = len(TS_REQUEST)  # a control message asking the kernel to timestamp one datagram's send
TS_REQUEST_HW = struct.pack(  # ...by the kernel and by the network card (ntp.hwtimestamp)
    "@NiiI4x", socket.CMSG_LEN(4), socket.SOL_SOCKET, SO_TIMESTAMPING,
    SOF_TIMESTAMPING_TX_SOFTWARE | SOF_TIMESTAMPING_TX_HARDWARE,
)  # fmt: skip
_HARDWARE_AT = 32  # the third timespec of a struct scm_timestamping: the raw hardware time
_TIMESPEC = struct.Struct("@qq")
Hardware = Callable[[int], int]  # a network card's time (ns) -> the system clock's (0: not known yet)
_ALIGN = struct.calcsize("@N")  # control messages are aligned to a size_t (CMSG_ALIGN)
PKTINFO_SPACE = socket.CMSG_SPACE(20)  # room for struct in6_pktinfo (struct in_pktinfo is 12 bytes)
_CMSG_HEAD = struct.Struct("@Nii")
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python 3.11's socket module lacks the name
PKTINFO = {(socket.IPPROTO_IP, IP_PKTINFO), (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)}
_SCM_TIMESTAMPNS = 35  # == SO_TIMESTAMPNS
_MSG_WAITFORONE = 0x10000
_MSG_ERRQUEUE, _MSG_DONTWAIT = 0x2000, 0x40
_ERRQ_CONTROL = 512  # control bytes per error-queue slot (the timestamps and the extended error)
_ERRQ_FIRST = struct.Struct(f"@NiiqQ{_ERRQ_CONTROL - 32}x")  # a slot read as its first cmsg and a timespec
_TS_CMSG_MIN = 16 + 16  # an SO_TIMESTAMPING message long enough for its first time
_SOL_SOCKET = socket.SOL_SOCKET
_TIMESTAMPING = ((socket.SOL_SOCKET, SO_TIMESTAMPING),)
# A sockaddr_storage slot read as IPv4: family read big-endian (compared to a swapped constant), port, address
_NAME4_SLOT = struct.Struct(">HH4s120x")
_NAME6 = struct.Struct(">HHI16s")
_SCOPE = struct.Struct("=I")
_FAMILY4 = struct.unpack(">H", struct.pack("=H", socket.AF_INET))[0]
_FAMILY6 = struct.unpack(">H", struct.pack("=H", socket.AF_INET6))[0]
_IP_CACHE = 65536  # address strings kept (cleared when full)


_recvmmsg = _sendmmsg = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _recvmmsg, _sendmmsg = _libc.recvmmsg, _libc.sendmmsg
    _recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    _recvmmsg.restype = ctypes.c_int
    _sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    _sendmmsg.restype = ctypes.c_int
except (OSError, AttributeError):
    pass


TS_FLAGS = (1 << 4) | (1 << 3)  # SOF_TIMESTAMPING_SOFTWARE | SOF_TIMESTAMPING_RX_SOFTWARE: what NTP sockets set


def kernel_timestamping(sock: socket.socket) -> bool:
    """Whether `sock` has SO_TIMESTAMPING on (else its receive times come through SO_TIMESTAMPNS
    and there are no kernel transmit times)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING) & TS_FLAGS == TS_FLAGS
    except OSError:
        return False


def available() -> bool:
    """True where the mmsghdr layout we pack is the platform's: 64-bit Linux (other systems that have
    recvmmsg lay out msghdr differently, and the sizes alone would not tell)."""
    return (
        _recvmmsg is not None
        and sys.platform == "linux"
        and _MMSG.size == 64
        and _IOVEC.size == 16
        and _CONTROL_LEN == _CMSG.size
        and _CONTROL_TS_LEN == _CMSG_TS.size
        and TS_REQUEST_SPACE == socket.CMSG_SPACE(4)
        and _LENGTHS.size == _MMSG.size
    )


def _buffer(size: int) -> tuple[memoryview, int]:
    raw = ctypes.create_string_buffer(size)
    return memoryview(raw).cast("B"), ctypes.addressof(raw)


class Batch:
    """Buffers and calls for one socket: `recv()` then `messages()`; `queue()` replies then `flush()`."""

    def __init__(
        self,
        sock: socket.socket,
        size: int,
        max_datagram: int,
        pktinfo: bool = False,
        timestamping: bool | None = None,
        hardware: Hardware | None = None,
    ) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not usable here")
        self.fd = sock.fileno()
        self.size = size
        self.slot = max_datagram + 1  # one spare byte: a longer datagram shows as oversize
        self._data = ctypes.create_string_buffer(size * self.slot)  # sliced directly: bytes in one step
        data_addr = ctypes.addressof(self._data)
        self.names, self._names_addr = _buffer(size * _NAME_LEN)
        self.pktinfo = pktinfo
        if timestamping is None:  # as the socket was set up
            timestamping = kernel_timestamping(sock)
        self.timestamping = timestamping  # SO_TIMESTAMPING (receive times, transmit times asked per reply)
        self.hardware = hardware if timestamping else None  # (a card's timestamps, converted)
        self._ts_request = TS_REQUEST_HW if self.hardware is not None else TS_REQUEST
        rx_ts = _CMSG_TS if timestamping else _CMSG
        self._rx_kind = SO_TIMESTAMPING if timestamping else _SCM_TIMESTAMPNS
        self._ctl = ctl = rx_ts.size + (PKTINFO_SPACE if pktinfo else 0)  # control bytes per slot
        self._cmsg = struct.Struct(f"{rx_ts.format}{ctl - rx_ts.size}x") if pktinfo else rx_ts
        self.control, control_addr = _buffer(size * ctl)
        self._rx_iov, rx_iov_addr = _buffer(size * _IOVEC.size)
        self.rx, self._rx_addr = _buffer(size * _MMSG.size)
        for i in range(size):
            _IOVEC.pack_into(self._rx_iov, i * _IOVEC.size, data_addr + i * self.slot, self.slot)
            _MMSG.pack_into(
                self.rx, i * _MMSG.size, self._names_addr + i * _NAME_LEN, _NAME_LEN,
                rx_iov_addr + i * _IOVEC.size, 1, control_addr + i * ctl, ctl, 0, 0,
            )  # fmt: skip
        self._pristine = bytes(self.rx)  # the kernel rewrites lengths; restored before each call
        self._out, self._out_addr = _buffer(size * self.slot)
        self._tx_iov, self._tx_iov_addr = _buffer(size * _IOVEC.size)
        self.tx, self._tx_addr = _buffer(size * _MMSG.size)
        self._txctl = txctl = (PKTINFO_SPACE if pktinfo else 0) + (TS_REQUEST_SPACE if timestamping else 0)
        self._tx_control, tx_control_addr = _buffer(size * txctl if txctl else 1)
        for i in range(size):  # reply j: iovec j over output slot j; only lengths, peers (and control) change
            _IOVEC.pack_into(self._tx_iov, i * _IOVEC.size, self._out_addr + i * self.slot, 0)
            tx_control = tx_control_addr + i * txctl if txctl else 0
            _MMSG.pack_into(self.tx, i * _MMSG.size, 0, 0, self._tx_iov_addr + i * _IOVEC.size, 1, tx_control, 0, 0, 0)
        if timestamping and not pktinfo:  # (then a slot's control data is only ever the stamp request)
            for j in range(size):
                self._tx_control[j * txctl : (j + 1) * txctl] = self._ts_request
        self.pending = 0
        self._controlled: set[int] = set()  # send slots whose message carries control data now
        self._ips: dict[bytes, str] = {}

    def recv(self) -> int:
        """Block until at least one datagram arrives; return how many slots were filled (-errno on error)."""
        self.rx[:] = self._pristine
        n = _recvmmsg(self.fd, self._rx_addr, self.size, _MSG_WAITFORONE, None)  # type: ignore[misc]
        return n if n >= 0 else -ctypes.get_errno()

    def messages(self, n: int) -> list[tuple[int, bytes, int, int, int, Any]]:
        """The first n slots after recv(): (slot, data, length on the wire, name length, receive time in
        ns or 0, peer). The peer is what socket.recvfrom gives: (ip, port) or (ip, port, flowinfo,
        scope_id); None for another family. One call per batch: per-slot calls cost more than this."""
        out: list[Any] = []  # (ctypes slices are bytes; typeshed says list)
        data, slot, names, ips = self._data, self.slot, self.names, self._ips
        heads = _LENGTHS.iter_unpack(self.rx[: n * _MMSG.size])
        cmsgs = self._cmsg.iter_unpack(self.control[: n * self._ctl])
        peers = _NAME4_SLOT.iter_unpack(names[: n * _NAME_LEN])
        start = 0
        rx_kind = self._rx_kind
        for i, (namelen, controllen, length), (_, _, kind, sec, nsec), (family, port, raw) in zip(
            range(n), heads, cmsgs, peers, strict=True
        ):
            rx = sec * 1_000_000_000 + nsec if controllen >= _CMSG.size and kind == rx_kind else 0
            peer: Any = None
            if family == _FAMILY4:
                ip = ips.get(raw)
                if ip is None:
                    if len(ips) >= _IP_CACHE:
                        ips.clear()
                    ip = ips[raw] = socket.inet_ntop(socket.AF_INET, raw)
                peer = (ip, port)
            elif family == _FAMILY6:
                off = i * _NAME_LEN
                _, port, flowinfo, raw6 = _NAME6.unpack_from(names, off)
                (scope,) = _SCOPE.unpack_from(names, off + 24)
                peer = (socket.inet_ntop(socket.AF_INET6, raw6), port, flowinfo, scope)
            out.append((i, data[start : start + (length if length < slot else slot)], length, namelen, rx, peer))
            start += slot
        if self.hardware is not None:
            self._hardware_times(out)
        return out

    def _hardware_times(self, out: list[Any]) -> None:
        """Where the network card stamped a datagram, its time replaces the kernel's (converted to
        the system clock; the kernel's stays while the card's clock is not measured yet)."""
        convert, control, ctl = self.hardware, self.control, self._ctl
        assert convert is not None
        for n, message in enumerate(out):
            if message[4]:  # (a timestamp message is there: room for all three times)
                rx = card_time(control, message[0] * ctl + _CMSG_HEAD.size, convert)
                if rx:
                    out[n] = (*message[:4], rx, message[5])

    def queue(self, i: int, namelen: int, reply: bytes, stamp: bool = False) -> None:
        """Queue `reply` to the peer of receive slot i (sent by flush()); with `stamp`, the kernel is
        asked for the time it leaves (read from the socket's error queue)."""
        j = self.pending
        start = j * self.slot
        n = len(reply)
        self._out[start : start + n] = reply
        _LENGTH.pack_into(self._tx_iov, j * _IOVEC_SIZE + 8, n)
        _PEER.pack_into(self.tx, j * _MMSG_SIZE, self._names_addr + i * _NAME_LEN, namelen)
        if stamp and not self.pktinfo:  # the stamp request alone: written in every slot at the start
            if j not in self._controlled:  # (else its length is there already)
                _LENGTH.pack_into(self.tx, j * _MMSG_SIZE + _CONTROLLEN_AT, TS_REQUEST_SPACE)
                self._controlled.add(j)
        elif stamp or self.pktinfo:  # the request's destination address becomes the reply's source; the stamp
            control = self.pktinfo_bytes(i) if self.pktinfo else b""
            if stamp:  # the next control message starts at the aligned end of this one (CMSG_NXTHDR)
                control += bytes(-len(control) % _ALIGN) + self._ts_request
            at = j * self._txctl
            self._tx_control[at : at + len(control)] = control
            _LENGTH.pack_into(self.tx, j * _MMSG_SIZE + _CONTROLLEN_AT, len(control))
            self._controlled.add(j)
        elif j in self._controlled:  # (a slot that carried a control message last time)
            self._controlled.discard(j)
            _LENGTH.pack_into(self.tx, j * _MMSG_SIZE + _CONTROLLEN_AT, 0)
        self.pending = j + 1

    def pktinfo_bytes(self, i: int) -> bytes:
        """The IP_PKTINFO / IPV6_PKTINFO control message the kernel gave receive slot i, whole (header
        included, as sendmsg takes it), or b"" when there is none."""
        base = i * self._ctl
        (_, controllen, _) = _LENGTHS.unpack_from(self.rx, i * _MMSG_SIZE)
        found = find_cmsg(self.control, base, base + min(controllen, self._ctl), PKTINFO)
        return b"" if found is None else bytes(self.control[found[0] : found[0] + found[1]])

    def pktinfo_ancillary(self, i: int) -> list[tuple[int, int, bytes]]:
        """Slot i's pktinfo as socket.sendmsg takes ancillary data ([] when there is none)."""
        found = self.pktinfo_bytes(i) if self.pktinfo else b""
        if not found:
            return []
        _, level, kind = _CMSG_HEAD.unpack_from(found)
        return [(level, kind, found[_CMSG_HEAD.size :])]

    def flush(self) -> list[tuple[int, int]]:
        """Send what is queued; returns (index in the queue, errno) of each datagram not sent."""
        errors: list[tuple[int, int]] = []
        count, start = self.pending, 0
        self.pending = 0
        while start < count:
            n = _sendmmsg(self.fd, self._tx_addr + start * _MMSG.size, count - start, 0)  # type: ignore[misc]
            if n > 0:
                start += n
                continue
            err = ctypes.get_errno() if n < 0 else errno.EIO
            if err == errno.EINTR:
                continue
            errors.append((start, err))
            start += 1  # that datagram is lost; the rest still go
        return errors


class ErrorQueue:
    """Batched reads of a socket's error queue (recvmmsg with MSG_ERRQUEUE, never blocking): the
    kernel's transmit timestamps, each with the datagram it belongs to as it left (from its link
    header on), so a timestamp costs a share of one system call instead of one of its own."""

    def __init__(self, sock: socket.socket, size: int, max_datagram: int, hardware: Hardware | None = None) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "recvmmsg is not usable here")
        self.hardware = hardware
        self.fd = sock.fileno()
        self.size = size
        self.slot = max_datagram + 256  # the reply and the headers in front of it
        self.data = ctypes.create_string_buffer(size * self.slot)  # the datagrams as they left (see stamps)
        data_addr = ctypes.addressof(self.data)
        self.control, control_addr = _buffer(size * _ERRQ_CONTROL)
        self._iov, iov_addr = _buffer(size * _IOVEC.size)
        self.msgs, self._msgs_addr = _buffer(size * _MMSG.size)
        for i in range(size):
            _IOVEC.pack_into(self._iov, i * _IOVEC.size, data_addr + i * self.slot, self.slot)
            _MMSG.pack_into(self.msgs, i * _MMSG.size, 0, 0, iov_addr + i * _IOVEC.size, 1,
                            control_addr + i * _ERRQ_CONTROL, _ERRQ_CONTROL, 0, 0)  # fmt: skip
        self._pristine = bytes(self.msgs)

    def read(self) -> list[tuple[bytes, int, bool]]:
        """What is queued now, up to `size`: (the datagram as it left, its transmit time in ns, and
        whether the network card took it: the kernel's software time, else the card's, converted);
        [] when nothing is (or on an error)."""
        data = self.data
        return [(data[start:end], tx, card) for start, end, tx, card in self.stamps()]  # type: ignore[misc]

    def stamps(self) -> list[tuple[int, int, int, bool]]:
        """`read` without copying the datagrams: (where each starts and ends in `data`, its transmit
        time, whether the card took it); valid until the next call."""
        self.msgs[:] = self._pristine
        n = _recvmmsg(self.fd, self._msgs_addr, self.size, _MSG_ERRQUEUE | _MSG_DONTWAIT, None)  # type: ignore[misc]
        out: list[tuple[int, int, int, bool]] = []
        if n <= 0:
            return out
        slot, control = self.slot, self.control
        heads = _LENGTHS.iter_unpack(self.msgs[: n * _MMSG_SIZE])
        firsts = _ERRQ_FIRST.iter_unpack(control[: n * _ERRQ_CONTROL])
        # the kernel puts the timestamp first (before IP_RECVERR): one C loop reads them all; a
        # message laid out otherwise, or with a card's time to convert, is walked cmsg by cmsg
        plain = self.hardware is None
        for i, (_, controllen, length), (cmsg_len, level, kind, sec, nsec) in zip(range(n), heads, firsts, strict=True):
            start = i * slot
            if plain and kind == SO_TIMESTAMPING and level == _SOL_SOCKET and _TS_CMSG_MIN <= cmsg_len <= controllen:
                out.append((start, start + min(length, slot), sec * 1_000_000_000 + nsec, False))
                continue
            found = self._walk(i * _ERRQ_CONTROL, min(controllen, _ERRQ_CONTROL))
            if found is not None:
                out.append((start, start + min(length, slot), *found))
        return out

    def _walk(self, base: int, controllen: int) -> tuple[int, bool] | None:
        """The transmit time in one slot's control messages, read one by one; None: there is none."""
        found = find_cmsg(self.control, base, base + controllen, _TIMESTAMPING)
        if found is None or found[1] < _TS_CMSG_MIN:
            return None
        at, cmsg_len = found
        return transmit_time(self.control, at + _CMSG_HEAD.size, cmsg_len - _CMSG_HEAD.size, self.hardware)


def find_cmsg(control: Any, pos: int, end: int, wanted: Container[tuple[int, int]]) -> tuple[int, int] | None:
    """The first control message in control[pos:end] whose (level, type) is `wanted`: where it
    starts and its length (cmsg_len, header included); None when there is none, or the messages
    stop making sense before it (a length too short, or past the end)."""
    while pos + _CMSG_HEAD.size <= end:
        cmsg_len, level, kind = _CMSG_HEAD.unpack_from(control, pos)
        if cmsg_len < _CMSG_HEAD.size or pos + cmsg_len > end:
            return None
        if (level, kind) in wanted:
            return pos, cmsg_len
        pos += socket.CMSG_SPACE(cmsg_len - _CMSG_HEAD.size)
    return None


def transmit_time(stamps: Any, at: int, length: int, hardware: Hardware | None) -> tuple[int, bool]:
    """The time in an error-queue SO_TIMESTAMPING message (its struct scm_timestamping, `length`
    bytes at `at` in `stamps`): the kernel's software time, or, in the card's own message (software
    time zero), the card's time converted to the system clock (0 while its clock is not measured
    yet); and whether it is the card's."""
    sec, nsec = _TIMESPEC.unpack_from(stamps, at)
    if (sec or nsec) or hardware is None or length < _HARDWARE_AT + _TIMESPEC.size:
        return sec * 1_000_000_000 + nsec, False
    return card_time(stamps, at, hardware), True


def card_time(stamps: Any, at: int, hardware: Hardware) -> int:
    """The network card's time in a struct scm_timestamping at `at` in `stamps` (its third time),
    converted to the system clock; 0 when there is none (or the card's clock is not measured yet)."""
    sec, nsec = _TIMESPEC.unpack_from(stamps, at + _HARDWARE_AT)
    return hardware(sec * 1_000_000_000 + nsec) if sec or nsec else 0
