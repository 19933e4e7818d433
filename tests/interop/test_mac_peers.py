"""Legacy MAC against real clients: chrony with its keyfile, ntpdig with ntp.keys (same secrets)."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from legacy.keyfile import load_keyfile
from nts.cli import fetch_metrics
from nts.server.metrics import parse_text
from tests.helpers import free_port, lab_config, need, port_123_free, running_ntsd
from tests.interop.peers import chrony_measure
from tests.mac_helpers import ALGORITHMS, mac_section, write_keys

pytestmark = pytest.mark.interop


def test_chrony_mac_client_for_each_algorithm_and_a_wrong_key(tmp_path: Path) -> None:
    ntp_keys, chrony_keys = write_keys(tmp_path)
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, extra="rate_limit: {enabled: false}\n") + mac_section(ntp_keys)
    with running_ntsd(tmp_path, config):
        for key_id, algorithm in ALGORITHMS.items():
            offset, output = chrony_measure(
                tmp_path / f"k{key_id}",
                f"server 127.0.0.1 port {port} key {key_id} iburst maxsamples 2",
                f"keyfile {chrony_keys}\n",
            )
            assert offset is not None, f"{algorithm.label}: {output}"
            assert abs(offset) < 0.001
            m = parse_text(fetch_metrics("127.0.0.1", mport))
            assert m[f'ntsd_mac_requests_total{{algorithm="{algorithm.label}",key="{key_id}"}}'] >= 2
        wrong = tmp_path / "wrong.keys"
        wrong.write_text("2 SHA1 HEX:" + "00" * 20 + "\n")
        wrong.chmod(0o600)
        offset, output = chrony_measure(
            tmp_path / "wrong",
            f"server 127.0.0.1 port {port} key 2 iburst maxsamples 2",
            f"keyfile {wrong}\n",
            timeout=5,
        )
        assert offset is None, output
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_naks_total{auth="mac",reason="bad_mac"}'] >= 1
        assert m.get('ntsd_replies_total{auth="none"}') == 0  # never unauthenticated time to a MAC client


def test_chrony_and_ntsd_read_one_chrony_keyfile_as_debian_installs_it(tmp_path: Path) -> None:
    """One file for both: mode 0640 root:_chrony, comments in UTF-8 and in each of chrony's comment
    styles, and an ASCII key with a '#' inside (part of the key to chrony; cut there, the MACs differ)."""
    keys = tmp_path / "chrony.keys"
    keys.write_text(
        "# Keys made with \u201cchronyc keygen\u201d\n! old style\n; also\n% and this\n9 SHA1 ab#cdefghijklmnop\n"
    )
    keys.chmod(0o640)
    os.chown(keys, 0, _chrony_gid())
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = lab_config(port, metrics_port=mport, extra="rate_limit: {enabled: false}\n")
    with running_ntsd(tmp_path, config + mac_section(keys, extra="  format: chrony\n")):
        offset, output = chrony_measure(
            tmp_path / "c", f"server 127.0.0.1 port {port} key 9 iburst maxsamples 2", f"keyfile {keys}\n"
        )
        assert offset is not None, output
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_mac_requests_total{algorithm="SHA1",key="9"}'] >= 2


def test_the_key_file_debian_installs_with_chrony_loads_unchanged() -> None:
    """The file itself, as the chrony package installs it (0640 root:_chrony, typographic quotes in its
    comments, no keys): it loads, with no problem and no key."""
    path = Path("/etc/chrony/chrony.keys")
    assert path.exists(), "chrony's package installs /etc/chrony/chrony.keys"
    keyfile = load_keyfile(path, "chrony")
    assert (keyfile.problems, dict(keyfile.keys)) == ((), {})


def _chrony_gid() -> int:
    try:
        return grp.getgrnam("_chrony").gr_gid  # the group Debian's chrony package creates
    except KeyError:
        return 0


def test_ntpdig_with_ntp_keys(tmp_path: Path) -> None:
    ntpdig = need("ntpdig")
    if os.geteuid() != 0:
        pytest.skip("binding port 123 needs root")
    assert port_123_free(), "something already listens on 127.0.0.1:123"
    ntp_keys, _ = write_keys(tmp_path)
    mport = free_port(socket.SOCK_STREAM)
    with running_ntsd(tmp_path, lab_config(123, metrics_port=mport) + mac_section(ntp_keys)):
        for key_id, algorithm in ALGORITHMS.items():
            proc = subprocess.run(
                [ntpdig, "-j", "-k", str(ntp_keys), "-a", str(key_id), "127.0.0.1"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert proc.returncode == 0, f"{algorithm.label}: {proc.stderr}"
            answer = json.loads(proc.stdout)
            assert answer["stratum"] == 1 and abs(answer["offset"]) < 0.01
        wrong = tmp_path / "wrong.keys"
        wrong.write_text("1 MD5 notthekey\n")
        wrong.chmod(0o600)
        proc = subprocess.run(
            [ntpdig, "-j", "-k", str(wrong), "-a", "1", "-t", "2", "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode != 0 and '"offset"' not in proc.stdout  # (ntpdig 1.2.2 itself crashes here)
        m = parse_text(fetch_metrics("127.0.0.1", mport))
        assert m['ntsd_naks_total{auth="mac",reason="bad_mac"}'] == 1
        assert m['ntsd_replies_total{auth="mac"}'] == len(ALGORITHMS)
