"""The MAC plugin in the running daemon: reloads, broken files, the clients report, metrics."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from legacy.keyfile import parse_keyfile
from nts.cli import fetch_metrics
from nts.server.metrics import parse_text
from tests.helpers import client_request, free_port, lab_config, query, running_ntsd
from tests.mac_helpers import independent_mac, mac_section, write_keys


def mac_request(keys_file: Path, key_id: int) -> bytes:
    key = parse_keyfile(keys_file.read_text(), "k", "ntp").keys[key_id]
    req = client_request()
    kind = "cmac" if key.algorithm.is_cmac else key.algorithm.value[1]
    return req + struct.pack(">I", key_id) + independent_mac(kind, key.secret, req, key.algorithm.mac_len)


def authenticated(port: int, keys_file: Path, key_id: int) -> bool:
    reply = query(port, mac_request(keys_file, key_id))
    assert reply is not None
    return reply[48:52] == struct.pack(">I", key_id)


def test_untrusting_a_key_on_sighup_stops_it_and_only_it(tmp_path: Path) -> None:
    ntp_keys, _ = write_keys(tmp_path)
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, extra="rate_limit: {enabled: false}\n")
    with running_ntsd(tmp_path, config + mac_section(ntp_keys, [1, 2, 4])) as server:
        assert all(authenticated(port, ntp_keys, k) for k in (1, 2, 4))
        assert not authenticated(port, ntp_keys, 3)  # in the file, not trusted
        (tmp_path / "ntsd.yaml").write_text(config + mac_section(ntp_keys, [1, 4]))
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for("configuration reloaded", start=mark)
        assert not authenticated(port, ntp_keys, 2)
        assert authenticated(port, ntp_keys, 1) and authenticated(port, ntp_keys, 4)
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_naks_total{auth="mac",reason="untrusted_key"}'] == 2
        assert m['ntsd_mac_requests_total{algorithm="MD5",key="1"}'] == 2
        assert m['ntsd_mac_requests_total{algorithm="AES-128-CMAC",key="4"}'] == 2
        assert m["ntsd_mac_ledger_entries"] == 3  # (127.0.0.1, key) for keys 1, 2 and 4
        assert not any("Traceback" in line or ntp_keys.read_text().split()[-1] in line for line in server.lines)


def test_key_file_changes_apply_and_broken_files_do_not(tmp_path: Path) -> None:
    ntp_keys, _ = write_keys(tmp_path)
    port = free_port()
    with running_ntsd(tmp_path, lab_config(port) + mac_section(ntp_keys)) as server:
        assert authenticated(port, ntp_keys, 2)
        old = ntp_keys.read_text()
        mark = len(server.lines)
        ntp_keys.write_text("1 MD5 onlykeyleft\nthis is not a key line\n")
        server.wait_for("the key file changed, but it cannot be used; keeping the keys in use", start=mark)
        server.wait_for(f"{ntp_keys}:2: the first field is not a key number", start=mark)
        ntp_keys.write_text(old)  # restore, so the request below is signed with a key in use
        signed_with_2 = mac_request(ntp_keys, 2)
        assert authenticated(port, ntp_keys, 2)
        mark = len(server.lines)
        ntp_keys.write_text("\n".join(line for line in old.splitlines() if not line.startswith("2 ")) + "\n")
        server.wait_for("loaded 5 keys", start=mark)
        reply = query(port, signed_with_2)
        assert reply is not None and reply[48:] == bytes(4)  # key 2 is gone: crypto-NAK


def test_clients_report_and_startup_refusals(tmp_path: Path) -> None:
    ntp_keys, _ = write_keys(tmp_path)
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport) + mac_section(ntp_keys)
    with running_ntsd(tmp_path, config):  # reports off (the default): `ntsd clients` says how to turn them on
        out = subprocess.run([sys.executable, "-m", "nts", "clients", "--metrics", f"127.0.0.1:{mport}"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 1 and "metrics.reports: true (off by default" in out.stderr
    config = config.replace("metrics: {listen:", "metrics: {reports: true, listen:")
    with running_ntsd(tmp_path, config) as server:
        server.wait_for(
            "MD5/SHA1 keys in use, key ids 1, 2 (deprecated by RFC 8573; move these clients to NTS or AES-CMAC)"
        )
        for key_id in (1, 4, 4):
            assert authenticated(port, ntp_keys, key_id)
        straggler = query(port, client_request() + struct.pack(">I", 99) + bytes(16))  # a key removed since
        assert straggler is not None and straggler[48:] == bytes(4)  # crypto-NAK
        out = subprocess.run(
            [sys.executable, "-m", "nts", "clients", "--metrics", f"127.0.0.1:{mport}", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        rows = json.loads(out.stdout)
        assert {(r["key_id"], r["algorithm"], r["requests"], r["deprecated"], r["refused"]) for r in rows} == {
            (1, "MD5", 1, True, ""),
            (4, "AES-128-CMAC", 2, False, ""),
            (99, "", 1, False, "unknown_key"),  # refused stragglers are listed too
        }
        table = subprocess.run(
            [sys.executable, "-m", "nts", "clients", "--metrics", f"127.0.0.1:{mport}"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert "deprecated: move to NTS" in table
        assert "REFUSED: key not in the key file" in table
    ntp_keys.chmod(0o644)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(lab_config(port) + mac_section(ntp_keys))
    proc = subprocess.run(
        [sys.executable, "-m", "nts", "serve", "-c", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        f"ntsd: {cfg}:6: mac.keys: {ntp_keys} is accessible to others (mode 0644); run: chmod o-rwx {ntp_keys}"
    )
