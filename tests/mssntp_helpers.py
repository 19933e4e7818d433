"""A stand-in for Samba's ntp_signd, for tests and the soak that need a signer but not a domain.

Strategy: a unix-socket server in threads that speaks the signd framing (mssntp.signd): it signs
every request with a zero MAC, except key ids ending in 7, which it refuses. `close()` ends the
listener and every connection, as a Samba restart would. The interop tests use a real Samba AD DC.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

from mssntp.signd import SIGNING_FAILURE, SIGNING_SUCCESS, encode_reply


class FakeSigner:
    def __init__(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous signer's socket file
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with self._lock:
                    self._conns.add(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            buf = b""
            while chunk := conn.recv(4096):
                buf += chunk
                while len(buf) >= 4 and len(buf) >= (end := 4 + int.from_bytes(buf[:4], "big")):
                    body, buf = buf[4:end], buf[end:]
                    packet_id, key_id = struct.unpack_from(">H", body, 8)[0], struct.unpack_from("<I", body, 12)[0]
                    if key_id % 10 == 7:
                        conn.sendall(encode_reply(SIGNING_FAILURE, packet_id))
                    else:
                        conn.sendall(encode_reply(SIGNING_SUCCESS, packet_id, body[16:] + body[12:16] + bytes(16)))
        with self._lock:
            self._conns.discard(conn)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
