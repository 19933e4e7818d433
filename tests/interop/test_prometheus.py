"""The metrics endpoint as Prometheus sees it: promtool's linter on what ntsd serves with every
plugin in use, a real Prometheus scraping ntsd, and the README's alert rules checked by promtool
and evaluated by that Prometheus on live figures (a refused reload must raise NtsdReloadFailed)."""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nts.cli import fetch_metrics
from nts.client import check_nts_reply, exchange, key_exchange, nts_request
from tests.helpers import client_request, free_port, need, query, running_ntsd, wait_until
from tests.mac_helpers import write_keys
from tests.mssntp_helpers import FakeSigner
from tests.nts_helpers import dev_certs, nts_config

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_rules() -> str:
    """The alert rules as the README gives them (its indented yaml block after the marker)."""
    text = README.read_text()
    block = re.search(r"<!-- alert rules: .*?-->\n\s*```yaml\n(.*?)\n\s*```", text, re.S)
    assert block is not None, "the README's alert rules block is gone"
    lines = block.group(1).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines) + "\n"


def busy_server_config(tmp_path: Path) -> tuple[str, int, int, int]:
    """ntsd with NTS, legacy MAC and MS-SNTP (a stand-in signer), two workers, metrics on."""
    ntp, ke, mport = free_port(), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    ntp_keys, _ = write_keys(tmp_path)
    config = nts_config(tmp_path, ntp, ke, mport, ntp_extra="workers: 2") + (
        f"mac: {{keys: {ntp_keys}}}\n"
        f"mssntp: {{socket: {tmp_path / 'signd'}, networks: [127.0.0.0/8], rate: 1000, burst: 1000}}\n"
    )
    return config, ntp, ke, mport


def test_promtool_finds_nothing_to_lint_in_the_metrics(tmp_path: Path) -> None:
    promtool = need("promtool")
    config, ntp, ke, mport = busy_server_config(tmp_path)
    signer = FakeSigner(tmp_path / "signd")
    try:
        with running_ntsd(tmp_path, config) as server:
            server.wait_for("ready with 2 workers")
            session = key_exchange("127.0.0.1", ke, dev_certs(tmp_path).ca)
            packet, uid, _ = nts_request(session, session.cookies[0])
            assert not check_nts_reply(session, exchange("127.0.0.1", ntp, packet)[0], uid)[0]
            assert query(ntp, client_request()) is not None
            assert query(ntp, client_request() + struct.pack("<I", 1105) + bytes(16)) is not None  # signed
            # workers publish their counters five times a second
            signed = 'ntsd_mssntp_sign_total{outcome="signed"} 1'
            text = wait_until(lambda: signed in (t := fetch_metrics("127.0.0.1", mport)) and t, 10, 0.2)
    finally:
        signer.close()
    for family in (
        "ntsd_nts_ke_sessions_total",
        "ntsd_replies_total",
        "ntsd_mssntp_sign_total",
        "ntsd_log_lines_total",
    ):
        assert f"# TYPE {family} counter" in text
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and not lint.stdout + lint.stderr, lint.stdout + lint.stderr


@contextmanager
def prometheus(tmp_path: Path, target_port: int, rules: Path) -> Iterator[str]:
    """A real Prometheus scraping ntsd every second and evaluating `rules`; yields its API base URL."""
    binary = need("prometheus")
    port = free_port(socket.SOCK_STREAM)
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{rules}]\n"
        f"scrape_configs: [{{job_name: ntsd, static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]}}]\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}/api/v1/"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def api(base: str, path: str, **params: str) -> Any:
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]


def until(what: str, probe: Any, timeout: float = 40.0) -> Any:
    """Ask `probe()` (Prometheus's API) until it returns something true: Prometheus has no event to
    wait on, it scrapes and evaluates on its own clock (here every second)."""

    def asked() -> Any:
        try:
            return probe()
        except OSError:
            return None  # not listening yet

    return wait_until(asked, timeout, 0.25, f"Prometheus showing {what}")


def test_prometheus_scrapes_ntsd_and_the_readme_alert_fires_on_a_refused_reload(tmp_path: Path) -> None:
    promtool = need("promtool")
    rules = tmp_path / "ntsd-alerts.yml"
    rules.write_text(readme_rules())
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    config = nts_config(tmp_path, port, free_port(socket.SOCK_STREAM), mport)
    with running_ntsd(tmp_path, config) as server, prometheus(tmp_path, mport, rules) as base:

        def value(expr: str) -> float | None:
            result = api(base, "query", query=expr)["result"]
            return float(result[0]["value"][1]) if result else None

        until("the ntsd target up", lambda: value('up{job="ntsd"}') == 1)
        assert until("ntsd's figures", lambda: value("ntsd_stratum")) == 1
        assert (value("ntsd_nts_certificate_expiry_timestamp_seconds") or 0) > time.time() + 30 * 86400

        def alerts() -> dict[str, str]:
            return {a["labels"]["alertname"]: a["state"] for a in api(base, "alerts")["alerts"]}

        until("the rules evaluated", lambda: api(base, "rules")["groups"][0]["rules"][0].get("lastEvaluation"))
        assert alerts() == {}  # a healthy server: nothing pending, the certificate far from expiry
        (tmp_path / "ntsd.yaml").write_text(config + "ntp: {}\n")  # a duplicate key: the reload is refused
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for("reload refused", start=mark)
        raised = until("NtsdReloadFailed", lambda: alerts().get("NtsdReloadFailed"))
        assert raised == "pending"  # for: 5m
        assert until("NtsdErrorsLogged", lambda: alerts().get("NtsdErrorsLogged")) == "firing"
