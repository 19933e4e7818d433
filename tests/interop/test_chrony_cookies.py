"""A server moved from chrony to ntsd: the cookies chrony issued open on ntsd (nts.chrony_keys), so
chrony's clients go on without a new NTS-KE and without an NTS NAK."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from nts.cli import fetch_metrics
from nts.nts.devcerts import make_dev_certs
from nts.server.metrics import parse_text
from tests.helpers import free_port, lab_config, listening, need, running_ntsd, wait_until

pytestmark = pytest.mark.interop


class Chronyd:
    """chronyd -d in the foreground, its log lines collected as they come."""

    def __init__(self, conf: Path, text: str) -> None:
        conf.write_text(text)
        self.proc = subprocess.Popen([need("chronyd"), "-x", "-d", "-u", "root", "-f", str(conf)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def stop(self) -> str:
        """SIGTERM (a client writes its cookies to ntsdumpdir as it stops, a server its keys)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        self._reader.join(5)
        return "".join(self.lines)


def test_chrony_clients_keep_their_cookies_across_a_switch_from_chrony_to_ntsd(tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])
    ntp, ke, mport = free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    server_dir, client_dir = tmp_path / "chrony-server", tmp_path / "chrony-client"
    server_dir.mkdir()
    client_dir.mkdir()
    server = Chronyd(server_dir / "chrony.conf",
                      f"port {ntp}\nntsport {ke}\nbindaddress 127.0.0.1\nntsservercert {certs.certificate}\n"
                      f"ntsserverkey {certs.private_key}\nntsdumpdir {server_dir}\nlocal stratum 1\n"
                      f"allow 127.0.0.1\ncmdport 0\npidfile {server_dir}/chronyd.pid\n")  # fmt: skip
    client_conf = (
        f"server 127.0.0.1 port {ntp} nts ntsport {ke} iburst minpoll -4 maxpoll -4\n"
        f"ntstrustedcerts {certs.ca}\nnocerttimecheck 1\nntsdumpdir {client_dir}\ncmdport 0\n"
        f"pidfile {client_dir}/chronyd.pid\n"
    )
    try:
        wait_until(lambda: listening(ke), 15, what="chrony's NTS-KE port")
        client = Chronyd(client_dir / "chrony.conf", client_conf)
        try:  # NTS-KE with chrony's server, then NTS samples enough to select it
            wait_until(lambda: client.said("Selected source 127.0.0.1") or client.proc.poll() is not None, 20)
            assert client.said("Selected source 127.0.0.1"), f"{client.stop()}\n{server.stop()}"
        finally:
            client_log = client.stop()
    finally:
        server_log = server.stop()
    keys = server_dir / "ntskeys"
    assert keys.exists(), server_log
    assert list(client_dir.glob("*.nts")), client_log  # the client's cookies, kept

    config = lab_config(ntp, metrics_port=mport, extra="rate_limit: {enabled: false}\n") + (
        f'nts: {{listen: ["127.0.0.1:{ke}"], certificate: {certs.certificate}, private_key: {certs.private_key}, '
        f"key_dir: {tmp_path / 'ntsd-keys'}, chrony_keys: {keys}}}\n"
    )
    with running_ntsd(tmp_path, config) as ntsd:
        ntsd.wait_for("opening chrony's cookies too: 4 keys")
        client = Chronyd(client_dir / "chrony.conf", client_conf)
        try:  # the same client, its cookies from chrony's server, now answered by ntsd
            wait_until(lambda: client.said("Selected source 127.0.0.1"), 20, what="chrony syncing to ntsd")
            m = wait_until(lambda: (m := parse_text(fetch_metrics("127.0.0.1", mport))).get(
                'ntsd_replies_total{auth="nts"}', 0) >= 4 and m, what="four NTS replies")  # fmt: skip
        finally:
            client_log = client.stop()
    assert m['ntsd_replies_total{auth="nts"}'] >= 4, client_log
    assert m.get("ntsd_nts_ke_connections_total", 0) == 0, {k: v for k, v in m.items() if "nts" in k and v}
    assert not {k: v for k, v in m.items() if k.startswith("ntsd_naks_total") and v}  # not one NTS NAK
    assert m.get('ntsd_replies_total{auth="none"}', 0) == 0
