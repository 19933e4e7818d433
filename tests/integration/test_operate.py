"""What an operator does to a running server: reload it, ask its status, read its log (workers too)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nts.cli import fetch_metrics
from nts.server import runtime
from nts.server.metrics import parse_text
from tests.helpers import Ntsd, client_request, free_port, lab_config, query, running_ntsd


def ntsd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nts", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def workers_of(server: Ntsd, count: int) -> list[int]:
    server.wait_for(f"ready with {count} workers")
    pid = server.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("workers", [1, 2])
def test_ntsd_reload_finds_the_server_and_reports_the_outcome(tmp_path: Path, workers: int) -> None:
    """The README's logrotate recipe `kill -HUP $(pidof -s ntsd)` found nothing (ntsd runs as python3)
    or a worker; `ntsd reload -c FILE` signals the right process and says whether it was applied."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, ntp_extra=f"workers: {workers}")
    with running_ntsd(tmp_path, config) as server:
        server.wait_for("ready")
        record = json.loads(runtime.record_path(str(tmp_path / "ntsd.yaml")).read_text())
        assert (record["pid"], record["metrics"]) == (server.proc.pid, ["127.0.0.1", mport])
        done = ntsd("reload", "-c", "ntsd.yaml", cwd=tmp_path)  # a relative name finds it too
        assert (done.returncode, done.stdout) == (
            0,
            f"ntsd (pid {server.proc.pid}) reloaded {tmp_path / 'ntsd.yaml'}\n",
        )
        (tmp_path / "ntsd.yaml").write_text(config + "clock: {stratum: 99}\n")
        refused = ntsd("reload", "--config", str(tmp_path / "ntsd.yaml"))
        assert refused.returncode == 1
        assert "was refused or applied in part; the server's log says why" in refused.stderr
    assert not runtime.record_path(str(tmp_path / "ntsd.yaml")).exists()  # removed at stop
    gone = ntsd("reload", "-c", str(tmp_path / "ntsd.yaml"))
    assert gone.returncode == 1 and gone.stderr.startswith(f"ntsd: no ntsd runs with {tmp_path / 'ntsd.yaml'}")


def test_sighup_to_a_worker_reloads_the_whole_server(tmp_path: Path) -> None:
    """`pidof -x` can pick a worker: it reloaded only itself, and the others ran the old file."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, ntp_extra="workers: 2")) as server:
        worker = workers_of(server, 2)[1]
        mark = len(server.lines)
        os.kill(worker, signal.SIGHUP)
        server.wait_for(f"SIGHUP sent to worker {worker}: reloading the whole server", start=mark)
        server.wait_for(f"ntsd[{server.proc.pid}] INFO ntsd: configuration reloaded", start=mark)
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_reloads_total{outcome="applied"}'] == 1


def test_status_reaches_the_running_server_when_the_file_has_changed_or_broken(tmp_path: Path) -> None:
    """After a reload that changed metrics.listen (applied only by a restart) status asked the new
    port; after a refused reload it printed only the configuration error."""
    port, mport, moved = free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport)) as server:
        server.wait_for("ready")
        assert query(port, client_request()) is not None
        (tmp_path / "ntsd.yaml").write_text(lab_config(port, metrics_port=moved))
        assert ntsd("reload", "-c", str(tmp_path / "ntsd.yaml")).returncode == 1  # applied in part
        status = ntsd("status", "-c", str(tmp_path / "ntsd.yaml"))
        assert status.returncode == 0, status.stderr
        assert "config_last_reload_successful" in status.stdout
        (tmp_path / "ntsd.yaml").write_text("ntp: [broken\n")
        status = ntsd("status", "-c", str(tmp_path / "ntsd.yaml"))
        assert status.returncode == 0, status.stderr
        assert 'requests_total{mode="plain"}' in status.stdout or "requests_total" in status.stdout


def test_with_workers_the_log_says_once_what_serves_where(tmp_path: Path) -> None:
    """With workers the log never named the NTP addresses or the metrics URL, each worker repeated
    what the others said, and each reload was logged as "configuration reloaded" three times."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, ntp_extra="workers: 2").replace("level: debug", "level: info")
    with running_ntsd(tmp_path, config) as server:
        first, second = workers_of(server, 2)
        pid = server.proc.pid
        assert any(f"ntsd[{pid}] INFO ntsd: serving NTP on 127.0.0.1:{port}" in line for line in server.lines)
        assert any(f"metrics on http://127.0.0.1:{mport}/metrics" in line for line in server.lines)
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for(f"ntsd[{pid}] INFO ntsd: configuration reloaded", start=mark)
        server.stop()
        reloaded = [line for line in server.lines[mark:] if "configuration reloaded" in line]
        assert len(reloaded) == 1, "\n".join(server.lines)
        assert not [line for line in server.lines if f"ntsd[{second}] worker 2/2 INFO" in line]
        assert all(f"ntsd[{first}] worker 1/2" in line for line in server.lines if f"ntsd[{first}]" in line)


def test_metrics_have_zero_series_build_info_and_process_figures(tmp_path: Path) -> None:
    """A labelled series that appears only at its first event has no increase for it (an alert on
    KoDs or drops never fired for the first burst); there was no build info or process metrics."""
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(port, metrics_port=mport, ntp_extra="workers: 2")) as server:
        workers_of(server, 2)
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        zeros = ('ntsd_kod_total{code="RATE"}', 'ntsd_kod_total{code="DENY"}', 'ntsd_drops_total{reason="too_short"}',
                 'ntsd_socket_errors_total{error="OSError"}', "ntsd_requests_total")  # fmt: skip
        for series in zeros:
            assert m[series] == 0, series
        assert not [k for k in m if k.startswith(("ntsd_nts_ke", "ntsd_mac", "ntsd_mssntp"))]  # not configured
        assert any(k.startswith('ntsd_build_info{version="') for k in m)
        single = m["process_resident_memory_bytes"]
        assert m["process_open_fds"] > 0 and m["process_cpu_seconds_total"] > 0
        assert abs(m["process_start_time_seconds"] - (time.time() - m["ntsd_uptime_seconds"])) < 5
        one = int(Path(f"/proc/{server.proc.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert single > one  # the main process and its two workers


def test_hwtimestamp_on_interfaces_without_it_is_logged_and_time_is_served(tmp_path: Path) -> None:
    """ntp.hwtimestamp names loopback (software timestamping only) and an interface that does not
    exist: both are said in the log, the server starts on software timestamps and serves, and a
    reload that changes the list says a restart applies that."""
    port = free_port()
    config = lab_config(port, ntp_extra="hwtimestamp: [lo, nosuch0]").replace("level: debug", "level: info")
    with running_ntsd(tmp_path, config) as server:
        text = "\n".join(server.lines)
        assert "ntp.hwtimestamp: lo: it does not timestamp packets in hardware; software timestamps there" in text
        assert "ntp.hwtimestamp: nosuch0: No such device; software timestamps there" in text
        assert "no interface gets hardware timestamps; software timestamps are used" in text
        reply = query(port, client_request())
        assert reply is not None and len(reply) == 48 and reply[39] & 1  # (a kernel receive timestamp, flagged)
        mark = len(server.lines)
        server.config.write_text(config.replace("hwtimestamp: [lo, nosuch0]", 'hwtimestamp: ["*"]'))
        server.signal(signal.SIGHUP)
        server.wait_for("ntp.hwtimestamp changed: a restart applies that, a reload cannot", start=mark)
