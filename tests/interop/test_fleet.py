"""A fleet in network namespaces: one NTS-KE front that names two NTP-only ntsd back-ends in turn
(Server Negotiation), all three sharing the cookie master secret, and a chrony client on a host of
its own. The client gets NTS samples from a back-end; with that back-end stopped it recovers
through a new NTS-KE; with the secret rotated on all three (SIGHUP) it recovers by itself.

Each host is a network namespace joined to a bridge by a veth pair, with an address that exists only
there (10.0.0.0/24); the whole topology lives in a network and mount namespace made for the test
(`unshare`), so nothing of it touches the machine's own network or /run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import need

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

INSIDE = r"""
import os, signal, subprocess, sys, time
from pathlib import Path
from nts.cli import fetch_metrics
from nts.nts.devcerts import make_dev_certs
from nts.server.metrics import parse_text

def sh(*args):
    subprocess.run(args, check=True)

def wait(probe, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            state = {h: {k: v for k, v in metrics(h).items() if v and ("nts" in k or "naks" in k)} for h in HOSTS}
            raise SystemExit(f"timed out: {what}; counters: {state}")
        time.sleep(0.1)  # (polling counters another process publishes)
    return value

sh("mount", "-t", "tmpfs", "tmpfs", "/run")  # (this mount namespace only: ip netns keeps its files here)
sh("ip", "link", "set", "lo", "up")
sh("ip", "link", "add", "br0", "type", "bridge")
sh("ip", "link", "set", "br0", "up")
sh("ip", "addr", "add", "10.0.0.254/24", "dev", "br0")
HOSTS = {"ke": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3", "client": "10.0.0.9"}
for name, addr in HOSTS.items():
    sh("ip", "netns", "add", name)
    sh("ip", "link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0", "netns", name)
    sh("ip", "link", "set", f"v{name}", "master", "br0", "up")
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "eth0", "up"],
                ["ip", "addr", "add", f"{addr}/24", "dev", "eth0"]):
        sh("ip", "netns", "exec", name, *cmd)

work = Path.cwd()
certs = make_dev_certs(work / "certs", ["10.0.0.1"])
secret = os.urandom(32)

def write_secret(host, value):
    keys = work / f"keys-{host}"
    keys.mkdir(mode=0o700, exist_ok=True)
    path = keys / "nts-master.key"
    tmp = keys / "new"
    tmp.write_text(value.hex() + "\n")  # (the format ntsd writes)
    tmp.chmod(0o600)
    tmp.rename(path)
    return keys

def config(host):
    addr = HOSTS[host]
    ntp = "127.0.0.1:123" if host == "ke" else f"{addr}:123"
    ke = f"{addr}:4460" if host == "ke" else "127.0.0.1:4460"
    front = ', ntp_server: ["10.0.0.2", "10.0.0.3"]' if host == "ke" else ""
    text = (f'ntp: {{listen: ["{ntp}"]}}\nrate_limit: {{enabled: false}}\nclock: {{local_reference: true}}\n'
            f'metrics: {{listen: "{addr}:9100"}}\n'
            f'nts: {{listen: ["{ke}"], certificate: {certs.certificate}, private_key: {certs.private_key}, '
            f'key_dir: {write_secret(host, secret)}{front}}}\n')
    (work / f"{host}.yaml").write_text(text)
    return work / f"{host}.yaml"

servers = {}
def start(host):
    env = {**os.environ, "RUNTIME_DIRECTORY": str(work / f"run-{host}")}
    servers[host] = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-m", "nts", "serve", "-c",
                                      str(config(host))], env=env, stderr=open(work / f"{host}.log", "a"))

def metrics(host):
    try:
        return parse_text(fetch_metrics(HOSTS[host], 9100))
    except OSError:
        return {}

def nts_replies(host):
    return metrics(host).get('ntsd_replies_total{auth="nts"}', 0)

def naks(host):
    return sum(v for k, v in metrics(host).items() if k.startswith("ntsd_naks_total"))

def ke_ok(m):
    return sum(v for k, v in m.items() if k.startswith('ntsd_nts_ke_sessions_total{outcome="ok"'))

client = None
try:
    for host in ("ke", "b", "c"):
        start(host)
    for host in ("ke", "b", "c"):
        wait(lambda: metrics(host) or servers[host].poll() is not None, f"{host} serving")
        assert servers[host].poll() is None, f"{host} exited"
    (work / "client.conf").write_text(
        "server 10.0.0.1 iburst nts minpoll -4 maxpoll -4\n"
        f"ntstrustedcerts {certs.ca}\nnocerttimecheck 1\ncmdport 0\npidfile {work}/chronyd.pid\n")
    client = subprocess.Popen(["ip", "netns", "exec", "client", "chronyd", "-x", "-d", "-u", "root", "-f",
                               str(work / "client.conf")], stdout=open(work / "chrony.log", "w"),
                              stderr=subprocess.STDOUT)
    first = wait(lambda: next((h for h in ("b", "c") if nts_replies(h) >= 3), None), "NTS samples from a back-end")
    other = "c" if first == "b" else "b"
    print("samples from", first, "named by the front:", ke_ok(metrics("ke")), "NTS-KE session(s)")
    servers[first].send_signal(signal.SIGTERM)
    servers[first].wait(15)
    wait(lambda: nts_replies(other) >= 3, "samples from the other back-end")
    print("back-end", first, "stopped: samples from", other, "after", ke_ok(metrics("ke")), "NTS-KE sessions")
    start(first)  # (back again, so the rotation reaches all three)
    wait(lambda: metrics(first), f"{first} serving again")
    before, sessions = nts_replies(other), ke_ok(metrics("ke"))
    secret = os.urandom(32)
    for host in ("ke", "b", "c"):
        write_secret(host, secret)
        servers[host].send_signal(signal.SIGHUP)
    wait(lambda: naks(other) >= 1 or naks(first) >= 1, "an NTS NAK for a cookie of the old secret")
    wait(lambda: ke_ok(metrics("ke")) > sessions, "a new NTS-KE session")
    wait(lambda: nts_replies(other) + nts_replies(first) >= before + 3, "samples again after the rotation")
    print("secret rotated: NAKs", naks(other) + naks(first), "then NTS-KE sessions", ke_ok(metrics("ke")),
          "and samples again")
finally:
    if client is not None:
        client.terminate()
        client.wait(10)
    for proc in servers.values():
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
    for host in HOSTS:
        subprocess.run(["ip", "netns", "del", host])
"""


def test_a_ke_front_with_two_ntp_back_ends_in_namespaces(tmp_path: Path) -> None:
    need("chronyd")
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    script = tmp_path / "fleet.py"
    script.write_text(INSIDE)
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        ["unshare", "--mount", "--net", "--propagation", "private", sys.executable, str(script)],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
        env={**os.environ, "PYTHONPATH": root, "NTSD_DIR": str(tmp_path)},
    )  # fmt: skip
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "samples from" in proc.stdout and "stopped: samples from" in proc.stdout, proc.stdout
    assert "secret rotated: NAKs" in proc.stdout, proc.stdout
    print(proc.stdout)
