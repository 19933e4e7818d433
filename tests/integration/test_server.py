"""The daemon as a process on loopback: queries, policy, metrics, reload, shutdown, workers."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nts.cli import fetch_metrics
from nts.server.metrics import parse_text
from nts.wire.packet import parse_packet
from nts.wire.timestamps import ntp64_to_unix_ns
from tests.helpers import (
    READY,
    Ntsd,
    client_request,
    free_port,
    lab_config,
    query,
    running_ntsd,
    wait_until,
    worker_reloaded,
)
from tests.mac_helpers import write_keys

NO_RATE = "rate_limit: {enabled: false}\n"


def metrics(port: int) -> dict[str, float]:
    return parse_text(fetch_metrics("127.0.0.1", port))


def check_time_reply(reply: bytes | None, request: bytes) -> None:
    assert reply is not None, "no reply"
    h = parse_packet(reply).header
    assert len(reply) == 48
    assert (h.mode, h.version, h.stratum, h.leap) == (4, (request[0] >> 3) & 7, 1, 0)
    assert h.origin_ts == int.from_bytes(request[40:48], "big")
    now = time.time_ns()
    assert abs(ntp64_to_unix_ns(h.receive_ts, now) - now) < 5 * 10**9
    assert h.receive_ts <= h.transmit_ts


def test_plain_ntp_over_ipv4_and_ipv6(tmp_path: Path) -> None:
    p4, p6 = free_port(), free_port(host="::1")
    config = lab_config(p4, listen=[f"127.0.0.1:{p4}", f"[::1]:{p6}"], extra=NO_RATE)
    with running_ntsd(tmp_path, config):
        for version in (1, 2, 3, 4):
            req = client_request(version=version)
            check_time_reply(query(p4, req), req)
        req = client_request()
        check_time_reply(query(p6, req, host="::1"), req)


def test_control_private_and_malformed_get_no_reply(tmp_path: Path) -> None:
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, extra=NO_RATE)):
        mode6 = bytes.fromhex("160200010000000000000000")  # ntpq READSTAT
        mode7 = bytes.fromhex("170003 2a".replace(" ", "")) + bytes(44)  # ntpdc MON_GETLIST_1 (monlist)
        mode6_long = bytes([0x16]) + bytes(47)
        mode7_long = bytes([0x17]) + bytes(47)
        server_mode = bytes([0x24]) + bytes(47)
        odd = client_request() + bytes(7)
        for packet in (mode6, mode7, mode6_long, mode7_long, server_mode, odd, b"", b"\x23"):
            assert query(port, packet, timeout=0.3) is None
        assert query(port, client_request()) is not None  # still serving
        m = metrics(mport)
        assert m['ntsd_drops_total{reason="mode_6"}'] == 2
        assert m['ntsd_drops_total{reason="mode_7"}'] == 2
        assert m['ntsd_drops_total{reason="mode_4"}'] == 1
        assert m['ntsd_drops_total{reason="too_short"}'] >= 1
        assert m['ntsd_drops_total{reason="malformed_trailer"}'] == 1
        assert m['ntsd_replies_total{auth="none"}'] == 1
        # an empty datagram may not be delivered at all on some kernels; the others were counted
        assert m["ntsd_requests_total"] >= 8


def test_denied_client_gets_kod_or_nothing(tmp_path: Path) -> None:
    port = free_port()
    extra = NO_RATE + "access: {deny: [127.0.0.2/32], allow: [127.0.0.0/8], deny_action: kod}\n"
    with running_ntsd(tmp_path, lab_config(port, extra=extra)) as server:
        reply = query(port, client_request(), source="127.0.0.2")
        assert reply is not None
        h = parse_packet(reply).header
        assert (h.stratum, h.reference_id, h.leap) == (0, b"DENY", 3)
        check_time_reply(query(port, client_request(), source="127.0.0.1"), client_request())
        (tmp_path / "ntsd.yaml").write_text(lab_config(port, extra=extra.replace("kod}", "ignore}")))
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for("configuration reloaded", start=mark)
        assert query(port, client_request(), source="127.0.0.2", timeout=0.3) is None


def test_flood_gets_rate_kod_and_memory_stays_bounded(tmp_path: Path) -> None:
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    extra = "rate_limit: {rate: 1, burst: 4, max_clients: 100, action: kod, kod_interval: 0.5}\n"
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, extra=extra)):
        codes = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            for _ in range(50):
                s.sendto(client_request(), ("127.0.0.1", port))
            while True:
                try:
                    codes.append(parse_packet(s.recv(100)).header.reference_id)
                except TimeoutError:
                    break
        assert codes[:4] == [b"LOCL"] * 4
        assert codes[4] == b"RATE"
        assert len(codes) < 10  # the rest were dropped: KoD answers are themselves limited
        # spray from 1000 loopback source addresses: the table stays within max_clients
        for i in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((f"127.1.{i >> 8}.{i & 255 or 1}", 0))
                s.sendto(client_request(), ("127.0.0.1", port))
        assert query(port, client_request(), source="127.0.0.9") is not None  # processed after the spray
        m = metrics(mport)
        assert 0 < m["ntsd_rate_limit_clients"] <= 100
        assert m['ntsd_kod_total{code="RATE"}'] >= 1


def test_reload_loses_no_packet_and_survives_a_broken_file(tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    with running_ntsd(tmp_path, lab_config(port, extra=NO_RATE)) as server:
        lost: list[int] = []
        answered: list[int] = []
        stop = threading.Event()
        progress = threading.Condition()

        def client() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                i = 0
                while not stop.is_set():
                    i += 1
                    req = client_request(transmit=i)
                    s.sendto(req, ("127.0.0.1", port))
                    try:
                        reply = s.recv(100)
                        (answered if reply[24:32] == req[40:48] else lost).append(i)
                    except TimeoutError:
                        lost.append(i)
                    with progress:
                        progress.notify_all()

        def answers_grow() -> None:
            """Let the client get a few answers in, so that it runs through every reload."""
            with progress:
                goal = len(answered) + 3
                assert progress.wait_for(lambda: len(answered) >= goal or bool(lost), 20)

        t = threading.Thread(target=client)
        t.start()
        try:
            for n in range(3):
                answers_grow()
                mark = len(server.lines)
                server.signal(signal.SIGHUP)
                server.wait_for("configuration reloaded", start=mark)
                if n == 1:  # add a second listen address on the fly
                    (tmp_path / "ntsd.yaml").write_text(
                        lab_config(port, listen=[f"127.0.0.1:{port}", f"127.0.0.1:{port2}"], extra=NO_RATE)
                    )
            server.wait_for(f"listening on 127.0.0.1:{port2}")
            assert query(port2, client_request()) is not None
            (tmp_path / "ntsd.yaml").write_text("ntp: {workers: zero}\n")
            answers_grow()
            mark = len(server.lines)
            server.signal(signal.SIGHUP)
            server.wait_for("reload refused, keeping the running configuration", start=mark)
            assert query(port2, client_request()) is not None
            answers_grow()
        finally:
            stop.set()
            t.join()
        assert lost == []
        assert len(answered) >= 15  # the client ran throughout the reloads


def test_sigterm_and_sigint_stop_cleanly(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        port = free_port()
        cfg = tmp_path / f"{sig}.yaml"
        cfg.write_text(lab_config(port))
        server = Ntsd(cfg, tmp_path)
        try:
            server.wait_for(READY)
            server.signal(sig)
            assert server.proc.wait(10) == 0
            server.wait_for("stopped")
            assert not any("Traceback" in line for line in server.lines)
        finally:
            server.stop()


def test_status_command_reads_metrics(tmp_path: Path) -> None:
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport)):
        assert query(port, client_request()) is not None
        out = subprocess.run(
            [sys.executable, "-m", "nts", "status", "--config", str(tmp_path / "ntsd.yaml")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0
        lines = dict(line.rsplit(None, 1) for line in out.stdout.splitlines())
        assert lines['replies_total{auth="none"}'] == "1"
        assert lines["stratum"] == "1"
    down = subprocess.run(
        [sys.executable, "-m", "nts", "status", "--metrics", f"127.0.0.1:{mport}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1
    assert down.stderr.startswith(f"ntsd: cannot read metrics from 127.0.0.1:{mport}:")


def test_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(lab_config(port))
        proc = subprocess.run(
            [sys.executable, "-m", "nts", "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=30
        )
    assert proc.returncode == 1
    assert proc.stderr.endswith(
        f"ntsd: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another NTP server is probably running on it)\n"
    )


def test_a_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    """At start: a clear error and exit 1 (was a FileNotFoundError traceback). On reload: the
    error is logged where logging already goes, and the server keeps serving."""
    port = free_port()
    unusable = tmp_path / "a-directory"  # (a directory that does not exist is a configuration error)
    unusable.mkdir()
    cfg = tmp_path / "c.yaml"
    broken_log = f"log: {{level: debug, file: {unusable}}}"
    cfg.write_text(lab_config(port).replace("log: {level: debug}", broken_log))
    proc = subprocess.run(
        [sys.executable, "-m", "nts", "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stderr) == (
        1,
        f"ntsd: cannot open the log file {unusable}: Is a directory\n",
    )
    with running_ntsd(tmp_path, lab_config(port, extra=NO_RATE)) as server:
        (tmp_path / "ntsd.yaml").write_text(lab_config(port, extra=NO_RATE).replace("log: {level: debug}", broken_log))
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for(f"reload: cannot open the log file {unusable}: Is a directory", start=mark)
        server.wait_for("configuration reloaded", start=mark)
        assert query(port, client_request()) is not None


def test_workers_share_the_port_and_sum_their_counters(tmp_path: Path) -> None:
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, extra=NO_RATE, ntp_extra="workers: 2")
    with running_ntsd(tmp_path, config) as server:
        server.wait_for("ready with 2 workers")
        sources = [f"127.0.3.{i}" for i in range(1, 41)]  # many source ports/addresses spread over workers
        for src in sources:
            assert query(port, client_request(), source=src) is not None

        def summed() -> dict[str, float] | None:  # workers publish counters once a second
            m = metrics(mport)
            return m if m.get('ntsd_replies_total{auth="none"}') == len(sources) else None

        m = wait_until(summed, interval=0.2, what="every reply summed")
        assert m["ntsd_workers"] == 2


def _workers(server: Ntsd, count: int) -> list[int]:
    """The worker processes of a server started with `count` workers, once it is ready."""
    server.wait_for(f"ready with {count} workers")
    parent = server.proc.pid
    workers = [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    assert len(workers) == count
    return workers


def test_a_dead_worker_stops_the_whole_server_for_the_service_manager(tmp_path: Path) -> None:
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, ntp_extra="workers: 2")) as server:
        workers = _workers(server, 2)
        os.kill(workers[0], signal.SIGKILL)
        server.wait_for(f"worker {workers[0]} exited unexpectedly (killed by signal 9 (SIGKILL))")
        assert server.proc.wait(15) == 1
        assert not Path(f"/proc/{workers[1]}").exists() or "zombie" in Path(f"/proc/{workers[1]}/status").read_text()


def test_workers_stop_when_the_parent_is_killed_outright(tmp_path: Path) -> None:
    """kill -9 or the OOM killer on the parent: the workers must not live on as orphans holding the
    port, or the service manager's restart could not bind it."""
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, ntp_extra="workers: 2")) as server:
        workers = _workers(server, 2)
        parent = server.proc.pid
        exits = [os.pidfd_open(pid) for pid in workers]  # readable once that process has ended
        try:
            os.kill(parent, signal.SIGKILL)
            server.wait_for(f"the supervising process {parent} is gone; stopping")
            pending, deadline = set(exits), time.monotonic() + 10
            while pending and time.monotonic() < deadline:
                ready, _, _ = select.select(list(pending), [], [], deadline - time.monotonic())
                pending -= set(ready)
            assert not pending, "a worker outlived its parent"
        finally:
            for fd in exits:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)  # a failed test leaves no orphans either
                os.close(fd)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))  # free again: a new ntsd could start


def test_a_reload_sent_while_workers_start_is_carried_out(tmp_path: Path) -> None:
    """ "ready" is logged as the workers are forked, before they have their signal handlers: a SIGHUP
    then (a reload right after a start) killed them; now it waits for the handlers."""
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, extra=NO_RATE, ntp_extra="workers: 3")) as server:
        server.wait_for("ready with 3 workers")
        server.signal(signal.SIGHUP)
        mark = 0
        for _ in range(4):  # the parent and each worker
            mark = server.wait_for("configuration reloaded", start=mark) + 1
        assert query(port, client_request()) is not None
        assert server.stop() == 0


def test_a_hung_worker_does_not_hang_the_stop(tmp_path: Path) -> None:
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, ntp_extra="workers: 2")) as server:
        workers = _workers(server, 2)
        os.kill(workers[0], signal.SIGSTOP)  # hung: it cannot act on the stop
        try:
            server.signal(signal.SIGTERM)
            assert server.proc.wait(20) == 1
            server.wait_for(f"worker {workers[0]} did not stop within 5 s; killed")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(workers[0], signal.SIGKILL)  # a failed test leaves no stopped orphan


@pytest.mark.parametrize("workers", [1, 2])
def test_requests_the_kernel_dropped_are_counted(tmp_path: Path, workers: int) -> None:
    """Datagrams that overflow the receive buffer never reach ntsd; they are counted from the
    kernel's own figure, so that everything sent is either a request or a kernel drop."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, extra=NO_RATE, ntp_extra=f"workers: {workers}")
    with running_ntsd(tmp_path, config) as server:
        assert query(port, client_request()) is not None
        # workers publish once a second
        before = wait_until(lambda: (m := metrics(mport)).get("ntsd_requests_total", 0) >= 1 and m, interval=0.1)
        sent = 20_000  # several times what a 2 MiB receive buffer holds
        processes = [server.proc.pid]
        processes += [
            int(p) for p in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        ]
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)  # nothing is read while the datagrams arrive
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(sent):
                    s.sendto(client_request(), ("127.0.0.1", port))
        finally:
            for pid in processes:
                os.kill(pid, signal.SIGCONT)

        def counted() -> tuple[float, float]:
            m = metrics(mport)
            got = m.get("ntsd_requests_total", 0) - before["ntsd_requests_total"]
            return got, m.get("ntsd_kernel_drops_total", 0) - before.get("ntsd_kernel_drops_total", 0)

        # workers publish their counters once a second: read until the sums add up
        got, dropped = wait_until(lambda: (c := counted())[0] + c[1] >= sent and c, 15, 0.1, "the sums")
        assert dropped > 0 and got > 0
        assert got + dropped == sent
        server.wait_for("the kernel dropped")
        assert query(port, client_request()) is not None


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A stand-in for systemd's notification socket, named in NOTIFY_SOCKET for the ntsd started next."""
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        yield sock


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_is_told_ready_reloading_and_stopping(tmp_path: Path, workers: int, systemd: socket.socket) -> None:
    """Type=notify: systemd starts dependants once ntsd serves, and knows a reload or stop is under way."""
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, ntp_extra=f"workers: {workers}")) as server:
        assert systemd.recv(256) == b"READY=1"
        assert query(port, client_request()) is not None
        server.signal(signal.SIGHUP)
        reloading = systemd.recv(256).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert systemd.recv(256) == b"READY=1"
        server.signal(signal.SIGTERM)
        assert systemd.recv(256) == b"STOPPING=1"
        assert server.stop() == 0


def test_a_reload_is_reported_done_once_every_worker_has_applied_it(tmp_path: Path, systemd: socket.socket) -> None:
    """`systemctl reload` returns at READY=1: the parent said it (and logged the reload) as soon as
    it had signalled the workers, before they had read the file. A stopped worker holds it back."""
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, ntp_extra="workers: 2")) as server:
        slow, quick = _workers(server, 2)
        assert systemd.recv(256) == b"READY=1"
        os.kill(slow, signal.SIGSTOP)
        try:
            mark = len(server.lines)
            server.signal(signal.SIGHUP)
            assert systemd.recv(256).startswith(b"RELOADING=1")
            server.wait_for(worker_reloaded(quick), start=mark)
            parent = f"ntsd[{server.proc.pid}] INFO ntsd: configuration reloaded"
            assert not any(parent in line for line in server.lines[mark:])  # one worker has not
        finally:
            os.kill(slow, signal.SIGCONT)
        done = server.wait_for(parent, start=mark)
        assert systemd.recv(256) == b"READY=1"
        assert server.wait_for(worker_reloaded(slow), start=mark) < done


def test_a_worker_that_does_not_finish_a_reload_is_named_and_counted(tmp_path: Path) -> None:
    """A hung worker must not leave the reload unreported for ever (systemd would wait on it)."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, ntp_extra="workers: 2")) as server:
        slow, _ = _workers(server, 2)
        os.kill(slow, signal.SIGSTOP)
        try:
            mark = len(server.lines)
            server.signal(signal.SIGHUP)
            server.wait_for(f"reload: worker(s) {slow} not done after 10 s", timeout=30, start=mark)
            m = metrics(mport)
            assert m['ntsd_reloads_total{outcome="unconfirmed"}'] == 1
            assert m["ntsd_config_last_reload_successful"] == 0
        finally:
            os.kill(slow, signal.SIGCONT)
        server.wait_for(worker_reloaded(slow), start=mark)
        assert query(port, client_request()) is not None


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_says_which_changes_need_a_restart(tmp_path: Path, workers: int) -> None:
    """The metrics address, the number of workers (and, with workers, the NTP ports) are set at start:
    a reload changing them said nothing, so an operator believed them applied."""
    port, other, mport, mport2 = free_port(), free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, ntp_extra=f"workers: {workers}")) as server:
        config = lab_config(port, metrics_port=mport2, ntp_extra=f"workers: {workers + 1}", extra=NO_RATE)
        if workers > 1:
            config = config.replace(f'"127.0.0.1:{port}"', f'"127.0.0.1:{port}", "127.0.0.1:{other}"')
        (tmp_path / "ntsd.yaml").write_text(config)
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        changed = "ntp.workers, ntp.listen, metrics.listen" if workers > 1 else "ntp.workers, metrics.listen"
        server.wait_for(f"{changed} changed: a restart applies that, a reload cannot", start=mark)
        # applied in part: what runs is not what the file says (it counted as applied); the parent
        # concludes once every worker has reloaded
        m = wait_until(lambda: (m := metrics(mport)).get('ntsd_reloads_total{outcome="failed"}') == 1 and m)
        assert m["ntsd_uptime_seconds"] > 0  # still where it was
        assert m["ntsd_config_last_reload_successful"] == 0
        assert query(port, client_request()) is not None  # the rest (rate limiting off) applied


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_outcomes_and_warnings_are_in_the_metrics(tmp_path: Path, workers: int) -> None:
    """Operators alert on metrics, not logs: a refused reload (a broken file, or a key file the
    workers cannot use) shows as `config_last_reload_successful 0`, and every warning or error
    line as a rise of `log_lines_total`."""
    ntp_keys, _ = write_keys(tmp_path)
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, ntp_extra=f"workers: {workers}") + f"mac: {{keys: {ntp_keys}}}\n"
    with running_ntsd(tmp_path, config) as server:
        m = metrics(mport)
        assert m["ntsd_config_last_reload_successful"] == 1
        started = m["ntsd_config_last_reload_success_timestamp_seconds"]
        # MD5/SHA1 keys in use (keys load before a fork), and serving as root when the tests run as root
        assert m['ntsd_log_lines_total{level="warning"}'] == 1 + (os.geteuid() == 0)
        assert m['ntsd_log_lines_total{level="error"}'] == 0  # present from the start (alerts need a zero)

        def reload(expect: str) -> dict[str, float]:
            mark = len(server.lines)
            server.signal(signal.SIGHUP)
            server.wait_for(expect, start=mark)
            # workers publish their counters once a second
            return wait_until(
                lambda: (m := metrics(mport)).get('ntsd_log_lines_total{level="error"}', 0) >= errors and m, 10, 0.1
            )

        (tmp_path / "ntsd.yaml").write_text(config + "ntp: {}\n")  # a duplicate key: refused by the parent
        errors = 1
        m = reload("reload refused, keeping the running configuration")
        assert m['ntsd_reloads_total{outcome="failed"}'] == 1 and m["ntsd_config_last_reload_successful"] == 0
        assert m['ntsd_log_lines_total{level="error"}'] == errors

        (tmp_path / "ntsd.yaml").write_text(config)
        good = ntp_keys.read_text()
        ntp_keys.write_text(good + "not a key line\n")  # each serving process keeps its keys, applies the rest
        errors += workers + (workers > 1)  # each worker's line, then the parent's
        m = reload("reload not applied in full by worker(s)" if workers > 1 else "keeping the keys in use")
        assert m['ntsd_reloads_total{outcome="failed"}'] == 2 and m["ntsd_config_last_reload_successful"] == 0
        assert m['ntsd_log_lines_total{level="error"}'] >= errors

        ntp_keys.write_text(good)
        m = reload(f"ntsd[{server.proc.pid}] INFO ntsd: configuration reloaded")
        assert m['ntsd_reloads_total{outcome="applied"}'] == 1 and m["ntsd_config_last_reload_successful"] == 1
        assert m["ntsd_config_last_reload_success_timestamp_seconds"] > started

        unusable = tmp_path / "a-directory"  # every process goes on logging where it did
        unusable.mkdir()
        (tmp_path / "ntsd.yaml").write_text(config.replace("log: {level: debug}", f"log: {{file: {unusable}}}"))
        errors += 1 if workers == 1 else workers + 2  # each process's line, then the parent's summary
        m = reload("reload not applied in full by worker(s)" if workers > 1 else "configuration reloaded")
        assert m['ntsd_reloads_total{outcome="failed"}'] == 3 and m["ntsd_config_last_reload_successful"] == 0


def _pids_logging(path: Path, text: str, count: int, timeout: float = 10.0) -> set[str]:
    """The processes (ntsd[PID]) that wrote a line with `text` to `path`, once `count` of them have
    (the file has no event to wait on; it is read again until then)."""

    def pids() -> set[str]:
        lines = path.read_text().splitlines() if path.exists() else []
        return {line.split()[1] for line in lines if text in line}

    try:
        return wait_until(lambda: len(found := pids()) >= count and found, timeout)
    except AssertionError:
        return pids()  # fewer than `count`: the caller's assertion says which


def test_reload_reopens_the_log_file_in_every_process(tmp_path: Path) -> None:
    """logrotate renames the file and sends SIGHUP: the parent and every worker must go on in a new
    file (with workers, none of them reopened it, and a log file set by a reload was never used)."""
    port = free_port()
    log_file = tmp_path / "ntsd.log"
    with running_ntsd(tmp_path, lab_config(port, extra=NO_RATE, ntp_extra="workers: 2")) as server:
        server.wait_for("ready with 2 workers")
        (tmp_path / "ntsd.yaml").write_text(
            lab_config(port, extra=NO_RATE, ntp_extra="workers: 2").replace(
                "log: {level: debug}", f"log: {{level: debug, file: {log_file}}}"
            )
        )
        server.signal(signal.SIGHUP)
        assert len(_pids_logging(log_file, "configuration reloaded", 3)) == 3  # parent and both workers (debug)
        log_file.rename(tmp_path / "ntsd.log.1")  # what logrotate does, then it signals
        server.signal(signal.SIGHUP)
        assert len(_pids_logging(log_file, "configuration reloaded", 3)) == 3
        rotated = (tmp_path / "ntsd.log.1").read_text()
        assert rotated.count("configuration reloaded") == 3  # the second reload went to the new file only
        assert query(port, client_request()) is not None


NETNS_PRELUDE = """
import socket, struct, subprocess, sys
from pathlib import Path
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def start_ntsd(*args):
    server = subprocess.Popen([sys.executable, "-m", "nts", "serve", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    log = []
    for line in server.stdout:
        log.append(line)
        if "ready" in line:
            break
    return server, log


def stop_ntsd(server, log):
    server.terminate()
    print("".join(log) + server.communicate(timeout=10)[0])
"""

INSIDE_A_HOST_WITHOUT_IPV6 = """
subprocess.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1"], check=True)
subprocess.run([sys.executable, "-m", "nts", "certs"], check=True, capture_output=True)
server, log = start_ntsd()
try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(bytes([0x23]) + bytes(47), ("127.0.0.1", 123))
        print("reply", len(s.recv(100)))
finally:
    stop_ntsd(server, log)
"""

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"), reason="needs root, unshare and ip"
)


def run_in_netns(tmp_path: Path, script_text: str) -> subprocess.CompletedProcess[str]:
    """Run NETNS_PRELUDE + `script_text` in a network namespace of its own (only lo, brought up), in
    tmp_path, with this tree importable; the test asserts on what it printed."""
    script = tmp_path / "inside.py"
    script.write_text(NETNS_PRELUDE + script_text)
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "NTSD_DIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@needs_netns
def test_embedded_default_serves_ipv4_on_a_host_without_ipv6(tmp_path: Path) -> None:
    """The README's first command on a host (or container) with IPv6 disabled: it served nothing,
    failing on [::1]; now the embedded default keeps to IPv4 there (explicit configs stay strict).
    Run in a network namespace of its own, with IPv6 disabled in it."""
    proc = run_in_netns(tmp_path, INSIDE_A_HOST_WITHOUT_IPV6)
    assert "reply 48" in proc.stdout
    assert "serving NTP on 127.0.0.1:123" in proc.stdout and "serving NTS-KE on 127.0.0.1:4460" in proc.stdout
    assert "[::1]" not in proc.stdout


INSIDE_A_HOST_WITH_TWO_ADDRESSES = """
from tests.mssntp_helpers import FakeSigner
subprocess.run(["ip", "-6", "addr", "add", "::2/128", "dev", "lo", "nodad"], check=True)
signer = FakeSigner(Path("signd.socket").resolve())
Path("ntsd.yaml").write_text(
    'ntp: {listen: ["0.0.0.0:123", "[::]:123"], batch: @BATCH@}\\nrate_limit: {enabled: false}\\n'
    "metrics: {listen: null}\\n"
    "clock: {local_reference: true}\\n"
    f'mssntp: {{socket: {Path("signd.socket").resolve()}, networks: ["127.0.0.0/8", "::/0"]}}\\n'
)
server, log = start_ntsd("-c", "ntsd.yaml")
plain = bytes([0x23]) + bytes(47)
mssntp = bytes([0x1B]) + bytes(47) + struct.pack("<I", 1104) + bytes(16)
try:
    for dst, family in (("127.0.0.2", socket.AF_INET), ("::2", socket.AF_INET6), ("127.0.0.1", socket.AF_INET)):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((dst, 123))  # a connected socket takes replies from that address only, as clients check
            s.settimeout(2)
            counts = []
            for packets in ([plain], [plain] * 64, [mssntp]):  # one at a time; a batch; a deferred reply
                for p in packets:
                    s.send(p)
                got = 0
                try:
                    for _ in packets:
                        s.recv(100)
                        got += 1
                except TimeoutError:
                    pass
                counts.append(got)
            print(dst, "replies", *counts)
finally:
    stop_ntsd(server, log)
"""


@needs_netns
@pytest.mark.parametrize("batch", [32, 1])  # recvmmsg/sendmmsg, and recvmsg/sendmsg per datagram
def test_a_wildcard_socket_answers_from_the_address_asked(tmp_path: Path, batch: int) -> None:
    """Bound to 0.0.0.0 and ::, replies left from the address routing chose (here 127.0.0.1 for a request
    to 127.0.0.2), and clients drop a reply from an address they did not ask. Run in a network namespace
    of its own (only there may a test bind a wildcard address), with a second IPv6 address on lo: one
    reply at a time, a batch, and a deferred (MS-SNTP) reply, each from the address asked."""
    proc = run_in_netns(tmp_path, INSIDE_A_HOST_WITH_TWO_ADDRESSES.replace("@BATCH@", str(batch)))
    for dst in ("127.0.0.2", "::2", "127.0.0.1"):
        assert f"{dst} replies 1 64 1" in proc.stdout, proc.stdout


INSIDE_A_HOST_ON_A_LINK = """
subprocess.run(["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=True)
client = subprocess.Popen(["unshare", "-n", sys.executable, "-c", '''
import socket, subprocess, sys
print("in a namespace of its own", flush=True)  # only now can vb be moved here
sys.stdin.readline()  # vb is in this namespace now
subprocess.run(["ip", "link", "set", "vb", "up"], check=True)
subprocess.run(["ip", "-6", "addr", "add", "fe80::2/64", "dev", "vb", "nodad"], check=True)
with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
    s.settimeout(3)
    s.connect(("fe80::1", 123, 0, socket.if_nametoindex("vb")))  # replies from fe80::1 on vb only
    for packets in (1, 64):
        for _ in range(packets):
            s.send(bytes([0x23]) + bytes(47))
        got = 0
        try:
            for _ in range(packets):
                s.recv(100)
                got += 1
        except TimeoutError:
            pass
        print("link-local replies", got, flush=True)
'''], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert client.stdout.readline() == "in a namespace of its own\\n"
subprocess.run(["ip", "link", "set", "vb", "netns", str(client.pid)], check=True)
subprocess.run(["ip", "link", "add", "vc", "type", "veth", "peer", "name", "vd"], check=True)  # a second link:
for dev, addr in (("vc", "fe80::3"), ("vd", "fe80::4"), ("va", "fe80::1")):  # fe80::/64 is on both
    subprocess.run(["ip", "link", "set", dev, "up"], check=True)
    subprocess.run(["ip", "-6", "addr", "add", addr + "/64", "dev", dev, "nodad"], check=True)
Path("ntsd.yaml").write_text(
    'ntp: {listen: ["[::]:123"], batch: @BATCH@}\\nrate_limit: {enabled: false}\\nmetrics: {listen: null}\\n'
    "clock: {local_reference: true}\\n"
)
server, log = start_ntsd("-c", "ntsd.yaml")
try:
    client.stdin.write("go\\n")
    client.stdin.flush()
    print(client.communicate(timeout=30)[0], end="")
finally:
    stop_ntsd(server, log)
"""


@needs_netns
@pytest.mark.parametrize("batch", [32, 1])
def test_a_wildcard_socket_answers_a_link_local_client_on_its_link(tmp_path: Path, batch: int) -> None:
    """A client on the LAN asking fe80::1%vb: the reply must leave from fe80::1 on that link (the
    scope travels with the address, the interface with the pktinfo), though fe80::/64 is on a second
    link too (with neither, the reply takes the other link). Two network namespaces joined by a veth
    pair: the server's, made for the test, and the client's, made inside it."""
    proc = run_in_netns(tmp_path, INSIDE_A_HOST_ON_A_LINK.replace("@BATCH@", str(batch)))
    assert "link-local replies 1\n" in proc.stdout and "link-local replies 64\n" in proc.stdout, proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_privileges_are_dropped_after_binding(tmp_path: Path) -> None:
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port, ntp_extra="user: nobody")) as server:
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4
        assert query(port, client_request()) is not None


def test_deny_kods_to_one_address_are_bounded(tmp_path: Path) -> None:
    """Requests with a denied (spoofable) source address: 1,000 in a burst get one DENY KoD, not 1,000;
    the rest are counted as access_denied drops."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(
        port, metrics_port=mport, extra="access: {deny: [127.0.0.2/32]}\nrate_limit: {enabled: false}\n"
    )
    with running_ntsd(tmp_path, config), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        for _ in range(1000):
            s.sendto(client_request(), ("127.0.0.1", port))
        assert query(port, client_request()) is not None  # the allowed are served; and all of the burst was read
        s.settimeout(0.5)
        kods = []
        with contextlib.suppress(TimeoutError):
            while True:
                kods.append(s.recv(100))
        assert len(kods) == 1 and kods[0][12:16] == b"DENY"
        m = wait_until(lambda: (m := metrics(mport)).get('ntsd_drops_total{reason="access_denied"}') == 1000 and m)
        assert m['ntsd_kod_total{code="DENY"}'] == 1


@pytest.mark.parametrize("workers", [2, 3])
def test_per_client_limits_do_not_multiply_with_workers(tmp_path: Path, workers: int) -> None:
    """The kernel spread one client's datagrams over the workers by source port, and each worker
    kept its own rate table: with 4 workers one address got about 4 times its burst. Each address
    now reaches one worker (steered by source address), so the burst is the server's."""
    port = free_port()
    extra = "rate_limit: {rate: 0.01, burst: 4, action: ignore}\n"
    with running_ntsd(tmp_path, lab_config(port, extra=extra, ntp_extra=f"workers: {workers}")) as server:
        server.wait_for(f"ready with {workers} workers")
        assert "cannot steer clients" not in "\n".join(server.lines)
        for source in ("127.0.0.9", "127.0.0.10"):
            with contextlib.ExitStack() as stack:
                clients = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(24)]
                for c in clients:  # each from a new source port
                    c.bind((source, 0))
                    c.sendto(client_request(), ("127.0.0.1", port))
                answered, deadline = 0, time.monotonic() + 0.5  # the unanswered have no event to wait on
                while (left := deadline - time.monotonic()) > 0:
                    readable, _, _ = select.select(clients, [], [], left)
                    for c in readable:
                        c.recv(100)
                        answered += 1
            assert answered == 4, source


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_files_made_before_the_privilege_drop_belong_to_the_service_user() -> None:
    """With ntp.user and a fresh key_dir, ntsd made the key directory and master secret as root,
    dropped to nobody, and the first SIGHUP could not read them (every logrotate tripped the reload
    alert). Now they are handed to nobody; and a key nobody could not read is refused at start and
    by check-config, not at the first reload."""
    import pwd
    import tempfile

    from nts.nts.devcerts import make_dev_certs
    from tests.nts_helpers import nts_config, ports

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="ntsd-drop-"))
    try:
        base.chmod(0o711)  # nobody may pass through, as /etc and /var/lib let it
        certs = make_dev_certs(base / "certs", ["localhost", "127.0.0.1"])
        (base / "certs").chmod(0o711)
        ntp, ke, mport = ports()
        config = nts_config(base, ntp, ke, mport, ntp_extra="user: nobody")
        (base / "ntsd.yaml").write_text(config)  # where nobody can read it again at the reload
        check = subprocess.run([sys.executable, "-m", "nts", "check-config", str(base / "ntsd.yaml")],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert check.returncode == 2 and "could not be read by nobody (ntp.user)" in check.stderr
        os.chown(certs.private_key, nobody.pw_uid, nobody.pw_gid)
        with running_ntsd(base, config) as server:
            keys = base / "keys"
            assert (keys.stat().st_uid, (keys / "nts-master.key").stat().st_uid) == (nobody.pw_uid, nobody.pw_uid)
            mark = len(server.lines)
            server.signal(signal.SIGHUP)
            server.wait_for("configuration reloaded", start=mark)
            assert not [line for line in server.lines[mark:] if "cannot be used" in line or " ERROR " in line]
            assert metrics(mport)["ntsd_config_last_reload_successful"] == 1
    finally:
        shutil.rmtree(base)
