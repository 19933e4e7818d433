"""NTS-KE behind a real load balancer: HAProxy (mode tcp, send-proxy-v2) in front of two ntsd
instances that share the cookie master secret; the client address in the PROXY header is the one
per-address limits, logs and metrics see."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from nts.cli import fetch_metrics
from nts.client import run_query
from nts.server.metrics import parse_text
from nts.wire.ke_records import RecordType
from tests.helpers import Ntsd, free_port, listening, need, running_ntsd, wait_until
from tests.interop.peers import chrony_measure
from tests.nts_helpers import AEAD15, NP, dev_certs, ke_raw, nts_config, ports, request

pytestmark = pytest.mark.interop


@contextmanager
def haproxy(tmp: Path, backends: list[int]) -> Iterator[int]:
    """HAProxy on a free port, round robin over `backends` (NTS-KE ports), each sent a PROXY v2 header."""
    front = free_port(socket.SOCK_STREAM)
    servers = "".join(f"  server s{i} 127.0.0.1:{port} send-proxy-v2\n" for i, port in enumerate(backends))
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        "global\n  maxconn 256\n"
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n"
        f"frontend ke\n  bind 127.0.0.1:{front}\n  default_backend ntsd\n"
        f"backend ntsd\n  balance roundrobin\n{servers}"
    )
    proc = subprocess.Popen([need("haproxy"), "-db", "-f", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_until(lambda: listening(front) or proc.poll() is not None, what="HAProxy listening")
        assert proc.poll() is None, proc.communicate()[0]
        yield front
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def two_behind_haproxy(tmp: Path, extra: str = "") -> Iterator[tuple[int, list[tuple[Ntsd, int]]]]:
    """Two ntsd instances (one master secret) behind HAProxy: (front port, [(instance, metrics port)])."""
    with ExitStack() as stack:
        backends = []
        for name in ("a", "b"):
            ntp, ke, mport = ports()
            (tmp / name).mkdir()
            config = nts_config(tmp, ntp, ke, mport, "  proxy_protocol: [127.0.0.1/32]\n")
            if extra:  # (in place of the lifted limits nts_config writes)
                config = config.replace("  ke_rate: 1000\n  ke_burst: 1000\n", extra)
            backends.append((stack.enter_context(running_ntsd(tmp / name, config)), mport, ke))
        front = stack.enter_context(haproxy(tmp, [ke for _, _, ke in backends]))
        yield front, [(server, mport) for server, mport, _ in backends]


def test_clients_get_nts_through_haproxy_and_are_seen_by_their_own_address(tmp_path: Path) -> None:
    ca = dev_certs(tmp_path).ca
    with two_behind_haproxy(tmp_path) as (front, backends):
        for _ in range(2):  # round robin: once through each instance; cookies open on either
            out = run_query("127.0.0.1", ke_port=front, ca=ca)
            assert out["authenticated"] is True
        dump = tmp_path / "chrony-dump"
        dump.mkdir()
        offset, output = chrony_measure(
            tmp_path / "chrony", f"server 127.0.0.1 nts ntsport {front} iburst maxsamples 4",
            f"ntstrustedcerts {ca}\nnocerttimecheck 1\nntsdumpdir {dump}\n",
        )  # fmt: skip
        assert offset is not None and abs(offset) < 0.001, output
        for _, mport in backends:
            m = parse_text(fetch_metrics("127.0.0.1", mport))
            assert m['ntsd_nts_ke_sessions_total{outcome="ok",aead="AES-SIV-CMAC-256"}'] >= 1
            assert not [k for k in m if k.startswith("ntsd_nts_ke_refused_total") and m[k]]  # headers all good


def test_the_per_address_limit_applies_to_the_client_behind_the_balancer(tmp_path: Path) -> None:
    limits = "  ke_rate: 0.001\n  ke_burst: 1\n"
    with two_behind_haproxy(tmp_path, limits) as (front, backends):
        got = [ke_raw(front, request(NP, AEAD15), source="127.0.0.2") for _ in range(3)]
        served = [isinstance(g, list) and RecordType.NEW_COOKIE in [r.type for r in g] for g in got]
        assert served[:2] == [True, True] and served[2] is False  # one per instance, then 127.0.0.2 is over
        other = ke_raw(front, request(NP, AEAD15), source="127.0.0.3")  # another client: its own budget
        assert isinstance(other, list)
        refused = sum(parse_text(fetch_metrics("127.0.0.1", m)).get('ntsd_nts_ke_refused_total{reason="rate"}', 0)
                      for _, m in backends)  # fmt: skip
        assert refused == 1
        logged = "NTS-KE session from 127.0.0.2: refused_rate"  # the client, not the balancer (127.0.0.1)
        assert wait_until(lambda: any(logged in line for server, _ in backends for line in server.lines))
