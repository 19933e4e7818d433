"""Our NTS server as a process: every AEAD with our client, KE misuse, restarts, certificate renewal."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from nts.cli import fetch_metrics
from nts.client import KeResult, QueryError, check_nts_reply, exchange, key_exchange, nts_request, run_query
from nts.nts import nettle
from nts.nts.devcerts import make_dev_certs
from nts.server.metrics import parse_text
from nts.wire.ke_records import Record, RecordReader, RecordType, serialize_records
from tests.helpers import Ntsd, free_port, running_ntsd, wait_until
from tests.nts_helpers import AEAD15, EOM, NP, dev_certs, ke_raw, nts_config, ports, request


def ke_events(mport: int) -> dict[str, float]:
    """The NTS-KE counters that are not zero, by event: connections, refused_REASON, accept_ERROR,
    and each session outcome (ok_AEAD-NAME for a session that agreed that AEAD)."""
    m = parse_text(fetch_metrics("127.0.0.1", mport))
    out: dict[str, float] = {}
    for key, value in m.items():
        labels = re.findall(r'="([^"]*)"', key)
        if key == "ntsd_nts_ke_connections_total":
            out["connections"] = value
        elif key.startswith("ntsd_nts_ke_refused_total"):
            out[f"refused_{labels[0]}"] = value
        elif key.startswith("ntsd_nts_ke_accept_errors_total"):
            out[f"accept_{labels[0]}"] = value
        elif key.startswith("ntsd_nts_ke_sessions_total"):
            out[f"ok_{labels[1]}" if labels[0] == "ok" else labels[0]] = value
    return {name: value for name, value in out.items() if value}


def session_outcomes(events: dict[str, float]) -> float:
    return sum(v for k, v in events.items() if k != "connections" and not k.startswith(("refused_access",
               "refused_rate", "refused_proxy_", "accept_")))  # fmt: skip


@pytest.mark.parametrize(
    "aead", ["AES-SIV-CMAC-256", "AES-SIV-CMAC-384", "AES-SIV-CMAC-512", "AES-128-GCM-SIV", "AES-256-GCM-SIV"]
)
def test_every_aead_with_our_client(tmp_path: Path, aead: str) -> None:
    ntp, ke, mport = ports()
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport)) as server:
        backend = f"AES-SIV-CMAC-256/-512 through {nettle.VERSION}" if nettle.AVAILABLE else "through cryptography"
        server.wait_for(backend)  # the log says which library does AES-SIV
        out = run_query("127.0.0.1", ke_port=ke, ca=dev_certs(tmp_path).ca, count=3, aeads=(aead,))
        assert out["authenticated"] is True and str(out["aead"]).startswith(aead)
        assert out["cookies_per_reply"] == 1.0
        assert abs(float(out["offset"])) < 0.01  # type: ignore[arg-type]
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_replies_total{auth="nts"}'] == 3


def test_ke_misuse_gets_documented_outcomes_and_service_continues(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    extra = "  max_request: 512\n  session_timeout: 1.0\n"
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport, extra)):
        assert ke_raw(ke, request(NP, AEAD15), alpn=[b"http/1.1"]).startswith("handshake failed")
        assert ke_raw(ke, request(NP, AEAD15), alpn=[]) == "closed"  # no ALPN: closed after the handshake
        assert ke_raw(ke, request(NP, AEAD15), max_version=SSL.TLS1_2_VERSION).startswith("handshake failed")
        unknown = ke_raw(ke, request(Record(True, 0x4321, b"?"), NP, AEAD15))
        assert isinstance(unknown, list)
        assert [(r.type, r.body) for r in unknown] == [
            (RecordType.ERROR, b"\x00\x00"),
            (RecordType.END_OF_MESSAGE, b""),
        ]
        duplicate = ke_raw(ke, request(NP, NP, AEAD15))
        assert isinstance(duplicate, list) and duplicate[0] == Record(True, RecordType.ERROR, b"\x00\x01")
        cookie_from_client = ke_raw(ke, request(NP, AEAD15, Record(False, RecordType.NEW_COOKIE, b"x" * 8)))
        assert isinstance(cookie_from_client, list) and cookie_from_client[0].body == b"\x00\x01"
        assert ke_raw(ke, request(NP, AEAD15, Record(False, 0x2222, bytes(600)))) == "closed"  # oversized
        assert ke_raw(ke, None) == "closed"  # says nothing: closed at the session deadline
        wait_until(lambda: ke_events(mport).get("timeout") == 1, what="the silent session timed out")
        ok = ke_raw(ke, request(NP, AEAD15))
        assert isinstance(ok, list) and [r.type for r in ok].count(RecordType.NEW_COOKIE) == 8
        events = ke_events(mport)
        assert events["refused_alpn"] == 1
        assert events["refused_no_alpn"] == 1
        assert events["handshake_failed"] == 1  # TLS 1.2 only
        assert events["error_unknown_critical_record"] == 1
        assert events["error_next_protocol_count"] == 1
        assert events["error_client_sent_server_record"] == 1
        assert events["refused_ke_too_long"] == 1
        assert events["timeout"] == 1
        assert events["ok_AES-SIV-CMAC-256"] == 1
        # each accepted connection ended in exactly one outcome (the counters were one family, and a
        # reply decided and then not taken counted twice)
        assert events["connections"] == session_outcomes(events)


def _client_hello() -> bytes:
    """A real TLS 1.3 ClientHello offering ntske/1, from an in-memory client."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_alpn_protos([b"ntske/1"])
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def test_peers_that_are_not_tls_or_vanish_are_closed_at_once_and_counted(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport, "  session_timeout: 30\n")):
        hello = _client_hello()
        with socket.create_connection(("127.0.0.1", ke), timeout=5) as s:  # not TLS at all
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):  # the rest of it unread: closed with a reset
                s.recv(4096)  # an alert or the close, well before the 30 s deadline (else: timeout)
        with socket.create_connection(("127.0.0.1", ke), timeout=5) as s:  # half a ClientHello, then FIN
            s.sendall(hello[: len(hello) // 2])
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):  # perhaps an alert, then the close (else: timeout)
                pass
        s = socket.create_connection(("127.0.0.1", ke), timeout=5)  # half a ClientHello, then RST
        s.sendall(hello[: len(hello) // 2])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        ok = ke_raw(ke, request(NP, AEAD15))
        assert isinstance(ok, list) and [r.type for r in ok].count(RecordType.NEW_COOKIE) == 8
        # the reset may be seen after the good session
        wait_until(lambda: ke_events(mport).get("client_closed_early", 0) >= 2, 5, what="the reset counted")
        events = ke_events(mport)
        assert events["handshake_failed"] == 1
        assert events["client_closed_early"] == 2
        assert events["ok_AES-SIV-CMAC-256"] == 1 and "timeout" not in events and "internal_error" not in events


def ke_gauges(mport: int) -> tuple[float, float]:
    """(sessions under way, connections that have not sent their first record yet)."""
    m = parse_text(fetch_metrics("127.0.0.1", mport))
    return m.get("ntsd_nts_ke_open_sessions", 0.0), m.get("ntsd_nts_ke_pending_connections", 0.0)


def reset_or_closed(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the server has closed `sock` (reset, or FIN after whatever it sent) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while sock.recv(65536):  # (what the server sent: its handshake flight)
            pass
    except (BlockingIOError, ssl.SSLWantReadError):  # nothing more to read, and not closed
        return True
    except OSError:
        return False
    return False


def accounted(mport: int) -> bool:
    """Every accepted NTS-KE connection has ended in one outcome or is still open."""
    events, (sessions, pending) = ke_events(mport), ke_gauges(mport)
    return events["connections"] == session_outcomes(events) + sessions + pending


def test_silent_connections_keep_no_client_out_and_end_at_their_deadline(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    extra = "  max_connections: 2\n  max_pending_connections: 3\n  first_bytes_timeout: 0.5\n  session_timeout: 30\n"
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport, extra)):
        silent = [socket.create_connection(("127.0.0.1", ke)) for _ in range(5)]
        try:
            # the kernel hands silent connections over after about a second (TCP_DEFER_ACCEPT); then
            # three wait, and each newer one makes the oldest make room
            wait_until(lambda: ke_events(mport).get("evicted", 0) >= 2, 15, what="two silent connections evicted")
            # a client that speaks is served meanwhile (its connection too may have made room)
            ok = ke_raw(ke, request(NP, AEAD15))
            assert isinstance(ok, list) and [r.type for r in ok].count(RecordType.NEW_COOKIE) == 8
            assert all(reset_or_closed(s) for s in silent)  # evicted, or reset at the first-bytes deadline
        finally:
            for s in silent:
                s.close()
        events = wait_until(lambda: (e := ke_events(mport)).get("no_first_bytes", 0) + e["evicted"] == 5 and e)
        assert events["evicted"] >= 2 and events["ok_AES-SIV-CMAC-256"] == 1
        assert wait_until(lambda: accounted(mport), what="every connection accounted for")


def _started_handshake(port: int, hello: bytes) -> socket.socket:
    """A connection that sent a whole ClientHello and then nothing (a handshake under way)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(hello)
    s.settimeout(10)
    assert s.recv(5)  # the server's flight began: this is a session now
    return s


def test_when_every_session_slot_is_taken_the_idlest_handshake_makes_room(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    extra = "  max_connections: 2\n  session_timeout: 30\n"
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport, extra)):
        older = _started_handshake(ke, _client_hello())
        newer = _started_handshake(ke, _client_hello())
        try:
            ok = ke_raw(ke, request(NP, AEAD15))
            assert isinstance(ok, list) and [r.type for r in ok].count(RecordType.NEW_COOKIE) == 8
            assert reset_or_closed(older)  # idle longest: evicted for the client that was ready
            assert still_open(newer)
        finally:
            older.close()
            newer.close()
        assert ke_events(mport)["evicted"] == 1
        assert wait_until(lambda: accounted(mport), what="every connection accounted for")


def _finished_handshake(port: int, ca: Path, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A session past its handshake that sends no request (it cannot be evicted)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["ntske/1"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def test_finished_handshakes_are_not_evicted_and_a_client_has_a_session_cap(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    extra = "  max_connections: 2\n  max_connections_per_client: 1\n  first_bytes_timeout: 0.5\n  session_timeout: 30\n"
    ca = dev_certs(tmp_path).ca
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport, extra)):
        first = _finished_handshake(ke, ca)
        try:
            # 127.0.0.1 has its one session: a second is left unread, then reset at its deadline
            assert ke_raw(ke, request(NP, AEAD15)).startswith(("handshake failed", "closed"))  # type: ignore[union-attr]
            assert ke_events(mport)["per_client"] == 1
            second = _finished_handshake(ke, ca, "127.0.0.2")  # another client: served
            try:
                # both slots hold finished handshakes: nothing to evict, so a third client waits and
                # is reset (busy); the two are untouched
                third = socket.create_connection(("127.0.0.1", ke), timeout=10, source_address=("127.0.0.3", 0))
                third.sendall(_client_hello())
                assert reset_or_closed(third)
                third.close()
                assert ke_events(mport)["busy"] == 1
                assert still_open(first) and still_open(second)
            finally:
                second.close()
        finally:
            first.close()
        assert wait_until(lambda: accounted(mport), what="every connection accounted for")


def test_ke_exempt_networks_have_no_session_cap_or_rate(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    extra = "  max_connections_per_client: 1\n  ke_rate: 0.001\n  ke_burst: 1\n  ke_exempt: [127.0.0.1/32]\n"
    config = nts_config(tmp_path, ntp, ke, mport, extra).replace("  ke_rate: 1000\n  ke_burst: 1000\n", "")
    ca = dev_certs(tmp_path).ca
    with running_ntsd(tmp_path, config):
        held = _finished_handshake(ke, ca)
        try:
            for _ in range(3):  # over the rate and beside a session of its own: still served
                ok = ke_raw(ke, request(NP, AEAD15))
                assert isinstance(ok, list) and [r.type for r in ok].count(RecordType.NEW_COOKIE) == 8
            # another address has both limits
            with socket.create_connection(("127.0.0.1", ke), timeout=10, source_address=("127.0.0.2", 0)):
                pass  # (its one-session burst)
            refused = socket.create_connection(("127.0.0.1", ke), timeout=10, source_address=("127.0.0.2", 0))
            refused.sendall(_client_hello())
            assert reset_or_closed(refused)  # held unread, then reset at its deadline
            refused.close()
        finally:
            held.close()
        events = ke_events(mport)
        assert events["refused_rate"] == 1 and "per_client" not in events


def test_cookies_survive_a_restart(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport)
    ca = dev_certs(tmp_path).ca
    with running_ntsd(tmp_path, config):
        result = key_exchange("127.0.0.1", ke, ca)
    secret = tmp_path / "keys" / "nts-master.key"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    with running_ntsd(tmp_path, config):
        packet, uid, _ = nts_request(result, result.cookies[0])
        reply, _, _ = exchange("127.0.0.1", ntp, packet)
        nak, cookies = check_nts_reply(result, reply, uid)
        assert not nak and len(cookies) == 1


def _ticket_received(port: int, ca: Path) -> bool:
    """One NTS-KE session with a client (Python's ssl, another OpenSSL) that would keep a ticket."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["ntske/1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request(NP, AEAD15))
        received = b""
        while chunk := tls.recv(65536):  # to the server's close_notify: tickets come before the response
            received += chunk
        assert received.endswith(b"\x80\x00\x00\x00")  # End of Message: a whole response was read
        assert tls.session is not None
        return bool(tls.session.has_ticket)


@pytest.mark.parametrize("operator_conf", [False, True])
def test_no_tls_session_tickets_unless_the_operator_configures_openssl(tmp_path: Path, operator_conf: bool) -> None:
    ntp, ke, _ = ports()
    env = None
    if operator_conf:  # the operator's own OpenSSL configuration is read instead of ntsd's (which has none of it)
        (tmp_path / "operator.cnf").write_text("# an operator's OpenSSL configuration, without NumTickets\n")
        env = {"OPENSSL_CONF": str(tmp_path / "operator.cnf")}
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke), env) as server:
        if operator_conf:
            server.wait_for(f"OpenSSL reads '{tmp_path / 'operator.cnf'}' (OPENSSL_CONF): NTS-KE sends TLS session")
        else:
            server.wait_for("NTS-KE sends no TLS session tickets")
        assert _ticket_received(ke, dev_certs(tmp_path).ca) is operator_conf


def reload_everywhere(server: Ntsd, workers: int) -> str:
    """SIGHUP, then wait until every process has finished its reload (the parent concludes once all
    workers have); returns what they logged meanwhile. Waiting for one worker's line let the next
    step of a test overtake a slower worker's reload (it then read the file the test wrote next)."""
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    ends = ("configuration reloaded",) if workers == 1 else (
        f"ntsd[{server.proc.pid}] INFO ntsd: configuration reloaded", "reload not applied in full by worker(s)"
    )  # fmt: skip
    end = server.wait_for(ends, start=mark) + 1
    return "\n".join(server.lines[mark:end])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_replaced_master_secret_applies_on_reload(tmp_path: Path, workers: int) -> None:
    """Rotating a (fleet's) secret needs no restart: replace the file, SIGHUP; cookies sealed with the
    old secret get NTS NAKs, clients redo NTS-KE and are served. A broken file keeps the old one."""
    ntp, ke, mport = ports()
    ca = dev_certs(tmp_path).ca
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport, ntp_extra=f"workers: {workers}")) as server:
        before = key_exchange("127.0.0.1", ke, ca)
        secret = tmp_path / "keys" / "nts-master.key"

        def ask(session: KeResult, cookie: int) -> bool:
            """True when served, False on an NTS NAK."""
            packet, uid, _ = nts_request(session, session.cookies[cookie])
            nak, _ = check_nts_reply(session, exchange("127.0.0.1", ntp, packet)[0], uid)
            return not nak

        assert ask(before, 0)
        staged = secret.with_suffix(".new")
        staged.write_text("zz\n")  # not a secret: refused, the old one stays
        staged.chmod(0o600)
        staged.replace(secret)
        assert reload_everywhere(server, workers).count("cannot be used, keeping the one in use") == workers
        assert ask(before, 1)
        staged.write_text(os.urandom(32).hex() + "\n")
        staged.chmod(0o600)
        staged.replace(secret)
        assert reload_everywhere(server, workers).count("a new master secret from") == workers
        assert not any(ask(before, i) for i in range(2, 2 + 2 * workers))  # whichever worker answers
        after = key_exchange("127.0.0.1", ke, ca)
        assert all(ask(after, i) for i in range(2 * workers))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_new_key_dir_waits_for_a_restart(tmp_path: Path, workers: int) -> None:
    """A reload cannot move the master secret: a changed nts.key_dir is named once (each worker
    said it, the other processes not at all), and the secret in use stays. It used to be applied
    by the next reload all the same, creating a new secret there (cookies issued before refused)."""
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport, ntp_extra=f"workers: {workers}")
    moved = tmp_path / "moved"
    with running_ntsd(tmp_path, config) as server:
        before = key_exchange("127.0.0.1", ke, dev_certs(tmp_path).ca)
        (tmp_path / "ntsd.yaml").write_text(config.replace(f"key_dir: {tmp_path / 'keys'}", f"key_dir: {moved}"))
        for reload in range(2):
            log = reload_everywhere(server, workers)
            assert log.count("nts.key_dir changed: a restart applies that, a reload cannot") == 1, reload
            assert "key_dir changes need a restart" not in log and "master secret" not in log
        assert not moved.exists()
        for cookie in range(2 * workers):  # whichever worker answers
            packet, uid, _ = nts_request(before, before.cookies[cookie])
            nak, _ = check_nts_reply(before, exchange("127.0.0.1", ntp, packet)[0], uid)
            assert not nak


def test_nts_enabled_again_by_a_reload_runs_with_its_new_key_dir(tmp_path: Path) -> None:
    """One process builds NTS anew when a reload enables it again, so a key_dir changed meanwhile
    is applied, and not named as needing a restart (the warning compared with the start's file);
    a later change of it is named, against the directory that is in use."""
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport)
    plain = config[: config.index("nts:\n")]
    moved = config.replace(f"key_dir: {tmp_path / 'keys'}", f"key_dir: {tmp_path / 'moved'}")
    with running_ntsd(tmp_path, config) as server:
        for text in (plain, moved):
            (tmp_path / "ntsd.yaml").write_text(text)
            assert "WARNING" not in reload_everywhere(server, 1)
        assert (tmp_path / "moved" / "nts-master.key").exists()  # built anew, with the new directory
        assert run_query("127.0.0.1", ke_port=ke, ca=dev_certs(tmp_path).ca)["authenticated"] is True
        (tmp_path / "ntsd.yaml").write_text(config)
        assert "nts.key_dir changed: a restart applies that" in reload_everywhere(server, 1)


def test_certificate_replaced_while_clients_connect(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport, "  cert_check_interval: 0.2\n")
    paths = dev_certs(tmp_path)
    new = make_dev_certs(tmp_path / "new", ["renewed.example", "127.0.0.1"], kind="rsa")  # EC -> RSA, new CA
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(paths.ca.read_bytes() + new.ca.read_bytes())
    with running_ntsd(tmp_path, config) as server:
        failures: list[str] = []
        subjects: list[str] = []
        progress = threading.Condition()
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    subject = key_exchange("127.0.0.1", ke, bundle).subject
                except QueryError as exc:
                    subject, _ = "", failures.append(str(exc))
                with progress:
                    subjects.append(subject)
                    progress.notify_all()

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            with progress:
                assert progress.wait_for(lambda: len(subjects) >= 10, 20)
            mark = len(server.lines)
            # an ACME client writes the new files beside the old ones and renames them into place
            staged_cert, staged_key = tmp_path / "certs" / "staged.pem", tmp_path / "certs" / "staged.key"
            shutil.copy(new.certificate, staged_cert)
            shutil.copy(new.private_key, staged_key)
            os.chmod(staged_key, 0o600)
            os.replace(staged_key, paths.private_key)
            os.replace(staged_cert, paths.certificate)
            server.wait_for("serving NTS-KE certificate CN=renewed.example", start=mark)
            with progress:
                seen = len(subjects)
                assert progress.wait_for(lambda: len(subjects) >= seen + 10, 20)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        assert subjects[0] == "CN=localhost" and subjects[-1] == "CN=renewed.example"


def test_certificate_files_named_by_a_reload_are_watched(tmp_path: Path) -> None:
    """After a reload points nts.certificate/private_key elsewhere, renewing those files is noticed
    without another SIGHUP (the watcher went on asking the certificate store it started with)."""
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport, "  cert_check_interval: 0.2\n")
    dev_certs(tmp_path)
    moved = make_dev_certs(tmp_path / "moved", ["moved.example", "127.0.0.1"])
    renewed = make_dev_certs(tmp_path / "renewed", ["renewed.example", "127.0.0.1"])
    with running_ntsd(tmp_path, config) as server:
        mark = len(server.lines)
        certs = tmp_path / "certs"
        (tmp_path / "ntsd.yaml").write_text(
            config.replace(f"{certs / 'server.pem'}", str(moved.certificate)).replace(
                f"{certs / 'server.key'}", str(moved.private_key)
            )
        )
        server.signal(signal.SIGHUP)
        server.wait_for("configuration reloaded", start=mark)
        assert key_exchange("127.0.0.1", ke, moved.ca).subject == "CN=moved.example"
        mark = len(server.lines)
        staged = moved.private_key.with_suffix(".new")
        shutil.copy(renewed.private_key, staged)
        staged.chmod(0o600)
        os.replace(staged, moved.private_key)
        shutil.copy(renewed.certificate, staged)
        os.replace(staged, moved.certificate)
        server.wait_for("serving NTS-KE certificate CN=renewed.example", start=mark)
        assert key_exchange("127.0.0.1", ke, renewed.ca).subject == "CN=renewed.example"


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport)
    key = dev_certs(tmp_path).private_key
    key.chmod(0o644)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config)
    proc = subprocess.run(
        [sys.executable, "-m", "nts", "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        f"nts.private_key: private key refused: {key} is accessible to others (mode 0644); run: chmod o-rwx {key} "
        "(for a development certificate run: ntsd certs)"
    )


def test_fleet_members_sharing_the_secret_file_accept_each_others_cookies(tmp_path: Path) -> None:
    a_dir, b_dir, c_dir = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a_dir, b_dir, c_dir):
        d.mkdir()
    ntp_a, ke_a, _ = ports()
    ntp_b, ke_b, _ = ports()
    ntp_c, ke_c, _ = ports()
    with running_ntsd(a_dir, nts_config(a_dir, ntp_a, ke_a)):
        result = key_exchange("127.0.0.1", ke_a, dev_certs(a_dir).ca)
    (b_dir / "keys").mkdir(mode=0o700)
    shutil.copy2(a_dir / "keys" / "nts-master.key", b_dir / "keys" / "nts-master.key")  # the fleet's one file
    with running_ntsd(b_dir, nts_config(b_dir, ntp_b, ke_b)), running_ntsd(c_dir, nts_config(c_dir, ntp_c, ke_c)):
        for port, shares in ((ntp_b, True), (ntp_c, False)):
            packet, uid, _ = nts_request(result, result.cookies[0])
            reply, _, _ = exchange("127.0.0.1", port, packet)
            nak, cookies = check_nts_reply(result, reply, uid)
            assert nak is not shares
            assert len(cookies) == (1 if shares else 0)


def test_workers_share_cookie_keys(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport).replace(
        f'["127.0.0.1:{ntp}"]}}', f'["127.0.0.1:{ntp}"], workers: 2}}'
    )
    assert "workers: 2" in config
    with running_ntsd(tmp_path, config) as server:
        server.wait_for("ready with 2 workers")
        ca = dev_certs(tmp_path).ca
        naks = replies = 0
        for _ in range(6):  # sessions land on either worker; requests (new source ports) on either
            result = key_exchange("127.0.0.1", ke, ca)
            for cookie in result.cookies[:4]:
                packet, uid, _ = nts_request(result, cookie)
                reply, _, _ = exchange("127.0.0.1", ntp, packet)
                nak, _ = check_nts_reply(result, reply, uid)
                naks += nak
                replies += not nak
        assert (naks, replies) == (0, 24)


def test_silent_and_trickling_clients_do_not_stall_others(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport, "  session_timeout: 20\n")):
        silent = [socket.create_connection(("127.0.0.1", ke)) for _ in range(5)]
        trickle = socket.create_connection(("127.0.0.1", ke))
        trickle.sendall(b"\x16\x03")  # the first bytes of a ClientHello, then nothing more
        try:
            out = run_query("127.0.0.1", ke_port=ke, ca=dev_certs(tmp_path).ca)  # its NTS-KE gives up after 5 s
            assert out["authenticated"] is True  # so served before anyone's deadline (20 s)
        finally:
            for s in [*silent, trickle]:
                s.close()


def test_sighup_reloads_the_certificate_and_negotiation_records(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    ke6 = free_port(socket.SOCK_STREAM, host="::1")
    extra = "  cert_check_interval: 3600\n"  # file watching effectively off: only SIGHUP can reload
    config = nts_config(tmp_path, ntp, ke, mport, extra).replace(
        f'listen: ["127.0.0.1:{ke}"]', f'listen: ["127.0.0.1:{ke}", "[::1]:{ke6}"]'
    )
    paths = dev_certs(tmp_path)
    with running_ntsd(tmp_path, config) as server:
        assert key_exchange("::1", ke6, paths.ca).aead == 15  # NTS-KE over IPv6
        with pytest.raises(QueryError, match=f"NTP to ::1 port {ntp} failed: Connection refused"):
            run_query("::1", ke_port=ke6, ca=paths.ca)  # no NTP on [::1] in this config: a clear error
        new = make_dev_certs(tmp_path / "new", ["localhost", "127.0.0.1"])
        shutil.copy(new.certificate, paths.certificate)
        shutil.copy(new.private_key, paths.private_key)
        assert key_exchange("127.0.0.1", ke, paths.ca).subject == "CN=localhost"  # old CA: still the old cert
        # point clients at another NTP host and port through the negotiation records
        (tmp_path / "ntsd.yaml").write_text(
            config.replace(f"  ntp_port: {ntp}\n", f"  ntp_port: {ntp}\n  ntp_server: localhost\n")
        )
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for("configuration reloaded", start=mark)
        result = key_exchange("127.0.0.1", ke, new.ca)  # verifies only with the new CA
        assert (result.server, result.port) == ("localhost", ntp)
        with pytest.raises(QueryError, match="certificate verify failed"):
            key_exchange("127.0.0.1", ke, paths.ca)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_nts_listen_changes_apply_on_reload(tmp_path: Path) -> None:
    """One process: new NTS-KE addresses are served after SIGHUP, dropped ones closed, and an address
    that cannot be bound is an error (the reload then counts as failed) while the rest applies."""
    ntp, ke, mport = ports()
    other, taken = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    config = nts_config(tmp_path, ntp, ke, mport)
    ca = dev_certs(tmp_path).ca
    with running_ntsd(tmp_path, config) as server:
        (tmp_path / "ntsd.yaml").write_text(config.replace(f'"127.0.0.1:{ke}"', f'"127.0.0.1:{other}"'))
        log = reload_everywhere(server, 1)
        assert f"serving NTS-KE on 127.0.0.1:{other}" in log and f"stopped serving NTS-KE on 127.0.0.1:{ke}" in log
        assert "restart" not in log
        assert key_exchange("127.0.0.1", other, ca).aead == 15
        assert _refused(ke)
        assert parse_text(fetch_metrics("127.0.0.1", mport))["ntsd_config_last_reload_successful"] == 1
        with socket.create_server(("127.0.0.1", taken)):  # someone else has this one
            both = f'"127.0.0.1:{ke}", "127.0.0.1:{taken}"'
            (tmp_path / "ntsd.yaml").write_text(config.replace(f'"127.0.0.1:{ke}"', both))
            log = reload_everywhere(server, 1)
        assert f"ERROR ntsd.nts: nts: cannot listen for NTS-KE on 127.0.0.1:{taken}: Address already in use" in log
        assert key_exchange("127.0.0.1", ke, ca).aead == 15  # the address that could be bound is served
        assert _refused(other)
        assert parse_text(fetch_metrics("127.0.0.1", mport))["ntsd_config_last_reload_successful"] == 0
        log = reload_everywhere(server, 1)  # the port is free now: the next reload takes it
        assert f"serving NTS-KE on 127.0.0.1:{taken}" in log
        assert key_exchange("127.0.0.1", taken, ca).aead == 15


def test_with_workers_listening_changes_are_said_to_need_a_restart(tmp_path: Path) -> None:
    """Workers share the NTS-KE sockets bound before they started. Enabling NTS by a reload had each
    worker bind the port: one served NTS-KE, the others refused the whole reload. Now changing where
    NTS-KE listens, enabling or disabling it, is named as needing a restart, and nothing else fails."""
    ntp, ke, mport = ports()
    other = free_port(socket.SOCK_STREAM)
    with_nts = nts_config(tmp_path, ntp, ke, mport, ntp_extra="workers: 2")
    plain = with_nts[: with_nts.index("nts:\n")]
    ca = dev_certs(tmp_path).ca
    with running_ntsd(tmp_path, plain) as server:
        (tmp_path / "ntsd.yaml").write_text(with_nts)
        log = reload_everywhere(server, 2)
        assert "nts (enabled) changed: a restart applies that, a reload cannot" in log
        assert "ERROR" not in log and "refused" not in log
        assert _refused(ke)
        # applied in part (NTS is not served until a restart), and counted so
        assert parse_text(fetch_metrics("127.0.0.1", mport))["ntsd_config_last_reload_successful"] == 0
    with running_ntsd(tmp_path, with_nts) as server:
        (tmp_path / "ntsd.yaml").write_text(with_nts.replace(f'"127.0.0.1:{ke}"', f'"127.0.0.1:{other}"'))
        log = reload_everywhere(server, 2)
        assert "nts.listen changed: a restart applies that" in log and "ERROR" not in log
        assert key_exchange("127.0.0.1", ke, ca).aead == 15 and _refused(other)
        (tmp_path / "ntsd.yaml").write_text(plain)
        log = reload_everywhere(server, 2)
        assert "nts (disabled) changed: a restart applies that" in log and "ERROR" not in log
        assert run_query("127.0.0.1", ke_port=ke, ca=ca)["authenticated"] is True  # NTS still served in full


def _trickle_proxy(target: int, delay: float) -> tuple[int, threading.Event]:
    """A one-connection TCP proxy to `target` that passes the client's bytes at once and the
    server's one byte every `delay` seconds (a server that trickles); set the event to stop it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        with listener, listener.accept()[0] as client, socket.create_connection(("127.0.0.1", target)) as server:
            client.settimeout(0.01)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    data = client.recv(4096)
                    if not data:
                        return
                    server.sendall(data)
                server.settimeout(0.01)
                with contextlib.suppress(TimeoutError):
                    one = server.recv(1)
                    if not one:
                        return
                    client.sendall(one)
                    stop.wait(delay)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], stop


def test_query_gives_up_on_a_trickling_or_silent_server_at_its_deadline(tmp_path: Path) -> None:
    """One deadline for the whole NTS-KE exchange: per-read time-outs alone let a server that
    sends a byte every few seconds hold `ntsd query` for hours."""
    ntp, ke, _ = ports()
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke)):
        port, stop = _trickle_proxy(ke, 0.02)  # the server's first flight alone would take ~20 s
        try:
            with pytest.raises(QueryError, match=f"^NTS-KE with 127.0.0.1 port {port} did not finish in time$"):
                key_exchange("127.0.0.1", port, dev_certs(tmp_path).ca, timeout=0.5)
        finally:
            stop.set()
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never answers
        with pytest.raises(QueryError, match="did not finish in time"):
            key_exchange("127.0.0.1", silent.getsockname()[1], dev_certs(tmp_path).ca, timeout=0.3)


def test_a_certificate_close_to_expiry_is_logged_and_exported(tmp_path: Path) -> None:
    """Renewals fail silently (an ACME client's cron job, a DNS change): ntsd says so two weeks ahead,
    and exports the expiry for alerting."""
    certs = make_dev_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], days=10)
    ntp, ke, mport = ports()
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke, mport)) as server:
        server.wait_for("WARNING ntsd.nts: NTS-KE certificate CN=localhost expires in 9 days")
        expiry = parse_text(fetch_metrics("127.0.0.1", mport))["ntsd_nts_certificate_expiry_timestamp_seconds"]
        cert = x509.load_pem_x509_certificate(certs.certificate.read_bytes())
        assert expiry == cert.not_valid_after_utc.timestamp()
        status = subprocess.run(
            [sys.executable, "-m", "nts", "status", "--metrics", f"127.0.0.1:{mport}"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        shown = dict(line.rsplit(None, 1) for line in status.splitlines())
        assert shown["nts_certificate_expiry_timestamp_seconds"] == f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%S}Z"


def test_nts_ke_obeys_the_access_lists_before_tls(tmp_path: Path) -> None:
    """An address on the deny list got 8 cookies while its NTP got DENY: NTS-KE now refuses it at
    accept, before a handshake (counted as refused_access), and still serves everyone else."""
    ntp, ke, mport = ports()
    config = nts_config(tmp_path, ntp, ke, mport) + "access:\n  deny: [127.0.0.2/32]\n"
    with running_ntsd(tmp_path, config):
        with socket.create_connection(("127.0.0.1", ke), source_address=("127.0.0.2", 0), timeout=5) as s:
            s.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a ClientHello
            try:
                answer = s.recv(4096)
            except ConnectionResetError:
                answer = b""
        assert answer == b""  # closed without a ServerHello
        ok = ke_raw(ke, request(NP, AEAD15))
        assert isinstance(ok, list) and [r.type for r in ok].count(RecordType.NEW_COOKIE) == 8
        events = ke_events(mport)
        assert events["refused_access"] == 1 and events["connections"] == 1 and "handshake_failed" not in events


def test_the_tls_key_log_is_private(tmp_path: Path) -> None:
    """`ntsd query --keylog` wrote the session's TLS secrets with the default umask (0644 here)."""
    ntp, ke, _ = ports()
    keylog = tmp_path / "keys.log"
    with running_ntsd(tmp_path, nts_config(tmp_path, ntp, ke)):
        run_query("127.0.0.1", ke_port=ke, ca=dev_certs(tmp_path).ca, keylog=keylog)
    assert keylog.stat().st_mode & 0o777 == 0o600 and b"CLIENT_HANDSHAKE_TRAFFIC_SECRET" in keylog.read_bytes()


def test_nts_ke_names_the_ntp_port_when_it_is_not_123(tmp_path: Path) -> None:
    """With NTP on another port and no nts.ntp_port, clients that follow RFC 8915 went to port 123
    (ntsd query: connection refused). The Port record now says where NTP is."""
    ntp, ke, _ = ports()
    config = nts_config(tmp_path, ntp, ke).replace(f"  ntp_port: {ntp}\n", "")
    assert "  ntp_port:" not in config
    with running_ntsd(tmp_path, config):
        out = run_query("127.0.0.1", ke_port=ke, ca=dev_certs(tmp_path).ca)  # no --port: the record's
        assert out["authenticated"] is True and out["server"] == f"127.0.0.1 port {ntp}"


def _v2_header(client: str, port: int = 40000) -> bytes:
    import ipaddress

    addresses = ipaddress.ip_address(client).packed + ipaddress.ip_address("127.0.0.1").packed
    body = addresses + struct.pack(">HH", port, 4460)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(body)) + body


def test_behind_a_balancer_the_proxy_header_names_the_client_and_bad_headers_are_refused(tmp_path: Path) -> None:
    ntp, ke, mport = ports()
    extra = "  proxy_protocol: [127.0.0.1/32]\n  first_bytes_timeout: 1.0\n"
    config = nts_config(tmp_path, ntp, ke, mport, extra) + "access: {deny: [192.0.2.0/24]}\n"
    with running_ntsd(tmp_path, config) as server:
        hello = _client_hello()
        ok = ke_raw(ke, request(NP, AEAD15), prefix=_v2_header("198.51.100.1"))  # v2, then the session
        assert isinstance(ok, list) and [r.type for r in ok].count(RecordType.NEW_COOKIE) == 8
        ok = ke_raw(ke, request(NP, AEAD15), prefix=b"PROXY TCP4 198.51.100.2 127.0.0.1 40001 4460\r\n")  # v1
        assert isinstance(ok, list)
        # the access lists judge the client the header names, not the balancer
        assert not isinstance(ke_raw(ke, request(NP, AEAD15), prefix=_v2_header("192.0.2.7")), list)
        server.wait_for("NTS-KE session from 192.0.2.7: refused_access")
        bad = {
            "proxy_missing": hello,  # a ClientHello where the header must be
            "proxy_malformed": b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),  # addresses cut short
            "proxy_family": b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c" + bytes(12),  # UDP
            "proxy_too_long": b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x10\x00" + bytes(64),  # 4 KiB announced
        }
        for sent in bad.values():
            with socket.create_connection(("127.0.0.1", ke), timeout=5) as s:
                s.sendall(sent)
                assert reset_or_closed(s, 5)  # at once (not at the 1 s deadline: see the sum below)
        with socket.create_connection(("127.0.0.1", ke), timeout=5) as s:  # half a header, then FIN
            s.sendall(_v2_header("198.51.100.3")[:20])
            s.shutdown(socket.SHUT_WR)
            assert reset_or_closed(s, 5)
        with socket.create_connection(("127.0.0.1", ke), timeout=5) as s:  # half a header, then nothing
            s.sendall(_v2_header("198.51.100.4")[:20])
            assert reset_or_closed(s, 5)  # at the first-bytes deadline
        # a header from an address that is not a balancer's is not believed
        with socket.create_connection(("127.0.0.1", ke), timeout=5, source_address=("127.0.0.2", 0)) as s:
            s.sendall(_v2_header("198.51.100.5") + hello)
            assert reset_or_closed(s, 5)
        events = wait_until(lambda: (e := ke_events(mport)).get("unexpected_proxy_header") and e)
        for reason in (*bad, "proxy_truncated", "proxy_timeout"):
            assert events[f"refused_{reason}"] == 1, (reason, events)
        assert events["refused_access"] == 1 and events["ok_AES-SIV-CMAC-256"] == 2
        assert wait_until(lambda: accounted(mport), what="every connection accounted for")


POOL_TOKEN = "pool-token-for-the-test-0123"


def _pool_request(*records: Record) -> bytes:
    auth = Record(False, RecordType.AUTHENTICATION, POOL_TOKEN.encode())
    return serialize_records([auth, *records, Record(True, RecordType.END_OF_MESSAGE)])


def _read_reply(tls: ssl.SSLSocket) -> list[Record]:
    reader, out = RecordReader(65536), []
    while not out or out[-1].type != RecordType.END_OF_MESSAGE:
        chunk = tls.recv(65536)
        assert chunk, "closed before End of Message"
        out += reader.feed(chunk)
    return out


def test_the_nts_pool_gets_support_and_cookies_for_its_keys_on_one_kept_connection(tmp_path: Path) -> None:
    """A client of ours as the NTS pool's key-exchange balancer: with its token it asks what is
    supported, then for cookies for keys it agreed with a client, on one Keep Alive connection; the
    cookies carry those keys (an NTS request made with them is answered). Without the token: Error 1."""
    ntp, ke, mport = ports()
    tokens = tmp_path / "pool.tokens"
    tokens.write_text(f"# the pool's\n{POOL_TOKEN}\n")
    tokens.chmod(0o600)
    config = nts_config(tmp_path, ntp, ke, mport, f"  pool_tokens: {tokens}\n  pool_connections: 1\n")
    ca = dev_certs(tmp_path).ca
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["ntske/1"])
    keep = Record(False, RecordType.KEEP_ALIVE)
    with running_ntsd(tmp_path, config), socket.create_connection(("127.0.0.1", ke), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(_pool_request(Record(True, RecordType.SUPPORTED_ALGORITHM_LIST), keep))
            support = _read_reply(tls)
            assert support[0].type == RecordType.SUPPORTED_ALGORITHM_LIST
            assert struct.pack(">HH", 15, 32) in support[0].body
            assert RecordType.KEEP_ALIVE in [r.type for r in support]
            # a second Keep Alive connection is over pool_connections: answered, not kept
            with (
                socket.create_connection(("127.0.0.1", ke), timeout=10) as raw2,
                ctx.wrap_socket(raw2, server_hostname="localhost") as other,
            ):
                other.sendall(_pool_request(Record(True, RecordType.SUPPORTED_NEXT_PROTOCOL_LIST), keep))
                assert RecordType.KEEP_ALIVE not in [r.type for r in _read_reply(other)]
            c2s, s2c = os.urandom(32), os.urandom(32)
            tls.sendall(_pool_request(Record(True, RecordType.FIXED_KEY_REQUEST, c2s + s2c), NP, AEAD15, keep))
            cookies = [r.body for r in _read_reply(tls) if r.type == RecordType.NEW_COOKIE]
            tls.sendall(_pool_request(Record(True, RecordType.FIXED_KEY_REQUEST, c2s + s2c), NP, AEAD15))
            last = _read_reply(tls)  # no Keep Alive asked: the server closes after it
            assert RecordType.KEEP_ALIVE not in [r.type for r in last] and tls.recv(100) == b""
        assert len(cookies) == 8
        session = KeResult(15, c2s, s2c, cookies, None, None, "", "")
        packet, uid, _ = nts_request(session, cookies[0])
        nak, fresh = check_nts_reply(session, exchange("127.0.0.1", ntp, packet)[0], uid)
        assert not nak and len(fresh) == 1  # the client's keys work with the pool's cookies
        denied = ke_raw(ke, serialize_records([Record(True, RecordType.SUPPORTED_ALGORITHM_LIST), EOM]))
        assert isinstance(denied, list) and (denied[0].type, denied[0].body) == (RecordType.ERROR, b"\x00\x01")
        events = wait_until(lambda: (e := ke_events(mport)).get("error_pool_not_permitted") and e)
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_nts_ke_pool_replies_total{kind="pool_support"}'] == 1
        assert m['ntsd_nts_ke_pool_replies_total{kind="pool_fixed_key"}'] == 1
        assert events["pool_fixed_key"] == 1 and events["pool_support"] == 1  # each connection's last reply
