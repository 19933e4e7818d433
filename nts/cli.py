"""The `ntsd` command: serve, check-config, reload, status, clients, query, certs, systemd-unit,
example-config, manpage (and the commands plugins add: keygen, keys).

Strategy: argparse subcommands; every expected failure (bad config, a port in use, a server not
running) ends as one line on stderr and a documented exit status, never a traceback:
0 success, 1 runtime failure, 2 configuration or usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, iter_lines, load_config, parse_hostport
from .net import format_addr, is_dns_name
from .nts import tlsconf
from .server import runtime
from .server.daemon import Daemon, StartupError, trust_service_user
from .server.metrics import parse_text
from .server.plugin import discover, sections

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


def _serve(args: argparse.Namespace) -> int:
    try:
        return Daemon(args.config).run()
    except ConfigError as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


def _shown(name: str, value: float) -> str:
    """A metric for people: every digit of a count, a timestamp as a UTC date."""
    if name.endswith("_timestamp_seconds"):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    return str(int(value)) if value.is_integer() else f"{value:.6g}"


def _check_config(args: argparse.Namespace) -> int:
    """The file, and what its plugin sections point at (certificates, keys, key files, sockets):
    what `serve` would refuse, found without binding a port or creating anything."""
    plugins = discover()
    try:
        config = load_config(args.file or args.config, sections(plugins))
    except ConfigError as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    trust_service_user(config)
    findings = [f for cls in plugins.values() if cls.section in config.plugins
                for f in cls.check(config.plugins[cls.section])]  # fmt: skip
    errors = [message for is_error, message in findings if is_error]
    for message in errors:  # most already name FILE:LINE: KEY; the others get the file
        where = "" if message.startswith(f"{config.source}:") else f"{config.source}: "
        print(f"ntsd: {where}{message}", file=sys.stderr)
    if errors:
        return EXIT_CONFIG
    print(f"{config.source}: OK")
    for line in iter_lines(config):
        print(f"  {line}")
    for cls in plugins.values():
        if cls.section in config.plugins and hasattr(cls, "describe"):
            for line in cls.describe(config.plugins[cls.section]):
                print(f"  {line}")
    for message in (*config.warnings, *(message for _, message in findings)):
        print(f"  warning: {message}")
    return EXIT_OK


def _certs(args: argparse.Namespace) -> int:
    from .files import default_dir
    from .nts.devcerts import make_dev_certs

    names = args.name or ["localhost", "127.0.0.1", "::1"]
    args.dir = args.dir or str(default_dir())
    existing = [Path(args.dir) / name for name in ("ca.pem", "ca.key", "server.pem", "server.key")]
    if any(path.exists() for path in existing) and not args.force:  # clients trusting that CA would break
        print(f"ntsd: {args.dir} already holds a development CA and certificate: kept (--force makes new ones; "
              "clients that trust the old CA then need the new ca.pem)", file=sys.stderr)  # fmt: skip
        return EXIT_OK
    try:
        paths = make_dev_certs(Path(args.dir), names, args.days, args.type)
    except ValueError as exc:  # a name that is neither an IP address nor a DNS name
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"ntsd: cannot write certificates to {args.dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"development CA:     {paths.ca}  (give this to clients, e.g. chrony's ntstrustedcerts)")
    print(f"server certificate: {paths.certificate}  for {', '.join(names)}")
    print(f"server key:         {paths.private_key}  (mode 0600)")
    return EXIT_OK


def _systemd_unit(args: argparse.Namespace) -> int:
    """The shipped unit (hardened, runs as the ntsd user), with the path of this ntsd."""
    unit = (Path(__file__).parent / "server" / "ntsd.service").read_text()
    ntsd = args.ntsd or shutil.which("ntsd") or os.path.abspath(sys.argv[0])
    print(unit.replace("/usr/local/bin/ntsd", ntsd), end="")
    return EXIT_OK


def _example_config(args: argparse.Namespace) -> int:
    """A commented configuration for a site (every key, the defaults commented)."""
    print((Path(__file__).parent / "example.yaml").read_text(), end="")
    return EXIT_OK


def _manpage(args: argparse.Namespace) -> int:
    """ntsd(8), in roff: `ntsd manpage > /usr/local/share/man/man8/ntsd.8`."""
    print((Path(__file__).parent / "ntsd.8").read_text(), end="")
    return EXIT_OK


def _query(args: argparse.Namespace) -> int:
    from .client import QueryError, run_query

    if args.keylog:  # checked here: a failure inside OpenSSL's callback could only print tracebacks
        try:
            with open(args.keylog, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)):
                pass
        except OSError as exc:
            print(f"ntsd: cannot write the TLS key log {args.keylog}: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG

    try:
        result = run_query(
            args.host,
            port=args.port,
            ke_port=args.ke_port,
            ca=Path(args.ca) if args.ca else None,
            plain=args.plain,
            count=args.count,
            aeads=tuple(args.aead) if args.aead else None,
            keylog=Path(args.keylog) if args.keylog else None,
            timeout=args.timeout,
        )
    except QueryError as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except ValueError as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    kiss = str(result.get("kiss") or "")
    if args.json:
        print(json.dumps(result, indent=2))
    elif not kiss:  # a KoD carries no time: no offset or delay to show
        each = result.pop("each", [])
        assert isinstance(each, list)
        for i, one in enumerate(each, 1):
            print(f"sample {i}: offset {one['offset']:+.9f} s, delay {one['delay']:.9f} s")
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = f"{value:+.9f} s" if key.startswith(("offset", "delay")) and isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    if kiss:
        meaning = _KISSES.get(kiss, "no time offered")
        print(f"ntsd: the server answered with a Kiss-o'-Death, {kiss}: {meaning}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


_KISSES = {  # RFC 5905 section 7.4, RFC 8915 section 5.7
    "RATE": "asking too often; slow down",
    "DENY": "access denied",
    "RSTR": "access restricted",
    "NTSN": "the NTS cookie was refused; do NTS-KE again",
}


class NotServed(OSError):
    """The endpoint answered 404; the message is its reason (reports off, no such report)."""


_MAX_ANSWER = 64 << 20  # far more than any report ntsd serves; something else is on that port


def fetch_metrics(host: str, port: int, timeout: float = 3.0, path: str = "/metrics") -> str:
    """The body of GET `path` from ntsd's metrics endpoint; OSError when what answers is not that."""
    deadline = time.monotonic() + timeout  # for the whole answer: a trickle cannot stretch it
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: ntsd\r\n\r\n".encode())
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError("no complete answer in time")
            conn.settimeout(left)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                raise OSError("no complete answer in time") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_ANSWER:
                raise OSError("unexpected answer: larger than 64 MiB")
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.0 404") and len(body) < 512:
        raise NotServed(body.decode(errors="replace").strip())
    if not head.startswith(b"HTTP/1.0 200"):
        raise OSError(f"unexpected answer: {head.splitlines()[0].decode(errors='replace') if head else 'nothing'}")
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise OSError("unexpected answer: not UTF-8 text") from None


_CLIENT_FIELDS = {"client": str, "key_id": int, "algorithm": str, "requests": int, "first_seen": str,
                  "last_seen": str, "deprecated": bool, "refused": str}  # fmt: skip
_REFUSALS = {  # why a client's requests were refused for its key: what to do about it
    "unknown_key": "REFUSED: key not in the key file (removed? give the client a current key or NTS)",
    "untrusted_key": "REFUSED: key not trusted (mac.trusted)",
    "key_not_allowed_for_client": "REFUSED: key not for this address (mac.networks)",
}


def _client_rows(text: str) -> list[dict[str, Any]]:
    """The clients report, checked to be what ntsd serves (ValueError otherwise)."""
    try:
        rows = json.loads(text)
    except RecursionError:
        raise ValueError("not a clients report (nested too deeply)") from None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and all(type(r.get(k)) is t for k, t in _CLIENT_FIELDS.items()) for r in rows
    ):
        raise ValueError("not a clients report (unexpected JSON)")
    return rows


def _metrics_address(args: argparse.Namespace) -> tuple[str, int] | int:
    """The metrics endpoint from --metrics, else the running server's record (what it bound, even
    when the file was edited or broken since), else the config; or an exit status after saying why."""
    try:
        if args.metrics:
            return _host_and_port(args.metrics)
        try:
            record = runtime.find(args.config)
        except runtime.NotRunning:
            pass  # no record (ntsd runs elsewhere, or not at all): the file says where to look
        else:
            if record.metrics is None:
                print(f"ntsd: the running server (pid {record.pid}) has no metrics endpoint (metrics.listen)",
                      file=sys.stderr)  # fmt: skip
                return EXIT_CONFIG
            return record.metrics
        config = load_config(args.config, sections(discover()))
    except ConfigError as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if config.metrics_listen is None:
        print("ntsd: metrics are disabled in the configuration (metrics.listen)", file=sys.stderr)
        return EXIT_CONFIG
    return config.metrics_listen


def _host_and_port(text: str) -> tuple[str, int]:
    """ADDRESS:PORT as the config takes it, or HOST:PORT with a name this host resolves (the CLI
    reaches a server: `--metrics localhost:9975`)."""
    try:
        return parse_hostport(_CliWhere(), text, 9975)
    except ConfigError:
        host, _, port = text.rpartition(":")
        if not (is_dns_name(host) and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError:
        raise _CliWhere().error(f"{text!r}: cannot resolve {host!r}") from None
    return str(found[0][4][0]), int(port)


def _clients(args: argparse.Namespace) -> int:
    where = _metrics_address(args)
    if isinstance(where, int):
        return where
    try:
        rows = _client_rows(fetch_metrics(*where, path="/report/clients"))
    except NotServed as exc:
        if "reports are off" in str(exc):
            print(f"ntsd: {format_addr(where)} serves no reports: set metrics.reports: true (off by default: the "
                  "report names clients, key ids and algorithms to anyone who can reach the metrics address)",
                  file=sys.stderr)  # fmt: skip
        else:  # reports on, but no plugin keeps this one
            print(f"ntsd: no mac section configured: the server at {format_addr(where)} keeps no clients report "
                  f"({exc})", file=sys.stderr)  # fmt: skip
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"ntsd: cannot read the clients report from {format_addr(where)}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except ValueError as exc:
        print(f"ntsd: cannot read the clients report from {format_addr(where)}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    head = ("client", "key", "algorithm", "requests", "first seen", "last seen", "")
    table = [head] + [
        (r["client"], str(r["key_id"]), r["algorithm"] or "-", str(r["requests"]), r["first_seen"], r["last_seen"],
         _REFUSALS.get(r["refused"], f"refused: {r['refused']}") if r["refused"]
         else "deprecated: move to NTS" if r["deprecated"] else "")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    where = _metrics_address(args)
    if isinstance(where, int):
        return where
    host, port = where
    try:
        text = fetch_metrics(host, port)
    except OSError as exc:
        print(f"ntsd: cannot read metrics from {format_addr((host, port))}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if args.raw:
        sys.stdout.write(text)
        return EXIT_OK
    values = parse_text(text)
    if not values:
        print(f"ntsd: no counters in what {format_addr((host, port))} answered (not ntsd?)", file=sys.stderr)
        return EXIT_RUNTIME
    width = max((len(k) for k in values), default=10)
    for name in sorted(values):
        print(f"{name.removeprefix('ntsd_'):<{width}} {_shown(name, values[name])}")
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    """SIGHUP to the server started with --config (found through its runtime record), then, when it
    has metrics, wait for the reload's outcome: exit 0 applied, 1 refused or applied in part."""
    try:
        record = runtime.find(args.config)
    except runtime.NotRunning as exc:
        print(f"ntsd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    before = _reload_counts(record.metrics) if record.metrics else None
    try:
        os.kill(record.pid, signal.SIGHUP)
    except OSError as exc:
        print(f"ntsd: cannot signal process {record.pid}: {exc.strerror}", file=sys.stderr)
        return EXIT_RUNTIME
    if before is None or record.metrics is None:
        print(f"asked ntsd (pid {record.pid}) to reload {record.config}; its log says how it went")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)  # polling a server in another process: there is no event to wait on
        after = _reload_counts(record.metrics)
        if after is not None and sum(after.values()) > sum(before.values()):
            outcome = max(after, key=lambda k: after[k] - before.get(k, 0))
            if outcome == "applied":
                print(f"ntsd (pid {record.pid}) reloaded {record.config}")
                return EXIT_OK
            print(f"ntsd: the reload of {record.config} was {_OUTCOMES.get(outcome, outcome)}; the server's log "
                  "says why", file=sys.stderr)  # fmt: skip
            return EXIT_RUNTIME
    print(f"ntsd: no reload outcome from pid {record.pid} within {args.timeout:g} s", file=sys.stderr)
    return EXIT_RUNTIME


_OUTCOMES = {"failed": "refused or applied in part", "unconfirmed": "not confirmed by every worker in time"}


def _reload_counts(where: tuple[str, int]) -> dict[str, float] | None:
    """ntsd_reloads_total by outcome, or None when the endpoint does not answer."""
    try:
        values = parse_text(fetch_metrics(*where))
    except OSError:
        return None
    prefix = 'ntsd_reloads_total{outcome="'
    return {k[len(prefix) : -2]: v for k, v in values.items() if k.startswith(prefix)}


def _in_range(parse: Callable[[str], float], lo: float, hi: float) -> Callable[[str], Any]:
    """An argparse type: a number `parse` reads, from lo to hi (argparse turns the ValueError into a
    usage error naming the function: "invalid number from 1 to 65535 value")."""

    def convert(text: str) -> Any:
        value = parse(text)
        if not lo <= value <= hi:
            raise ValueError(text)
        return value

    convert.__name__ = f"number from {lo:g} to {hi:g}"
    return convert


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    return _in_range(int, lo, hi)


def _number_in(lo: float, hi: float) -> Callable[[str], float]:
    return _in_range(float, lo, hi)


class _CliWhere:
    """Lets parse_hostport report command-line mistakes as ConfigError."""

    def error(self, message: str) -> ConfigError:
        return ConfigError("command line", None, "--metrics", message)


def main(argv: Sequence[str] | None = None) -> int:
    tlsconf.apply()  # before anything initialises OpenSSL (it reads its configuration once)
    parser = argparse.ArgumentParser(prog="ntsd", description="NTS, NTP, legacy MAC and MS-SNTP time server")
    parser.add_argument("--version", action="version", version=f"ntsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the server (embedded default configuration without --config)")
    p.add_argument("--config", "-c", metavar="FILE")
    p.set_defaults(func=_serve)
    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("file", nargs="?", help="file to check (the embedded default if omitted)")
    p.add_argument("--config", "-c", metavar="FILE", help="the same, as serve takes it")
    p.set_defaults(func=_check_config)
    p = sub.add_parser("certs", help="make a development CA and server certificate (never for production)")
    p.add_argument("--dir", help="output folder (default: the embedded configuration's, /var/lib/ntsd for root, "
                   "else ~/.local/state/ntsd; NTSD_DIR overrides)")  # fmt: skip
    p.add_argument(
        "--name", action="append", help="DNS name or IP address (repeatable; default: localhost, 127.0.0.1, ::1)"
    )
    p.add_argument("--days", type=_int_in(1, 3650), default=90, help="validity in days (default 90)")
    p.add_argument("--type", choices=("ec", "rsa"), default="ec", help="key type (default ec, P-256)")
    p.add_argument("--force", action="store_true", help="replace an existing CA and certificate")
    p.set_defaults(func=_certs)
    p = sub.add_parser("systemd-unit", help="print a hardened systemd unit for this ntsd")
    p.add_argument("--ntsd", metavar="PATH", help="the ntsd program the unit starts (default: this one)")
    p.set_defaults(func=_systemd_unit)
    p = sub.add_parser("example-config", help="print a commented configuration for a site")
    p.set_defaults(func=_example_config)
    p = sub.add_parser("manpage", help="print the ntsd(8) manual page (roff)")
    p.set_defaults(func=_manpage)
    p = sub.add_parser("query", help="query an NTS (or plain NTP) server and show what it answered")
    p.add_argument("host", help="server name or address (NTS-KE host with NTS)")
    p.add_argument("--port", type=_int_in(1, 65535), help="NTP port (default: what NTS-KE says, else 123)")
    p.add_argument("--ke-port", type=_int_in(1, 65535), default=4460, help="NTS-KE port (default 4460)")
    p.add_argument("--ca", metavar="FILE", help="trust this CA bundle instead of the system's")
    p.add_argument("--plain", action="store_true", help="plain NTP, no NTS")
    p.add_argument(
        "--count",
        type=_int_in(1, 1000),
        default=1,
        help="NTP exchanges to make (default 1); with more than one, each and their median, min, max",
    )
    p.add_argument("--timeout", type=_number_in(0.1, 60), default=3.0,
                   help="seconds to wait for NTS-KE and for each reply (default 3)")  # fmt: skip
    p.add_argument("--aead", action="append", help="offer only these AEADs, in order (name or IANA number)")
    p.add_argument("--keylog", metavar="FILE", help="append TLS secrets (SSLKEYLOGFILE format) for tshark")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_query)
    p = sub.add_parser("reload", help="make the server started with --config reload it, and say how that went")
    p.add_argument("--config", "-c", metavar="FILE", help="the file the server was started with (default: none)")
    p.add_argument("--timeout", type=_number_in(0.1, 600), default=15.0,
                   help="seconds to wait for the outcome (default 15)")  # fmt: skip
    p.set_defaults(func=_reload)
    p = sub.add_parser("status", help="show a running server's counters")
    p.add_argument("--config", "-c", metavar="FILE", help="the server started with this file (its metrics "
                   "address as it runs; the file's when no such server runs here)")  # fmt: skip
    p.add_argument("--metrics", metavar="ADDR:PORT", help="metrics address (overrides --config)")
    p.add_argument("--raw", action="store_true", help="print the Prometheus text as served")
    p.set_defaults(func=_status)
    p = sub.add_parser("clients", help="show which clients use legacy MAC keys (for the move to NTS)")
    p.add_argument("--config", "-c", metavar="FILE", help="the server started with this file (as for status)")
    p.add_argument("--metrics", metavar="ADDR:PORT", help="metrics address (overrides --config)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_clients)
    for ep in entry_points(group="ntsd.commands"):  # commands that plugins add (e.g. keygen)
        ep.load()(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    except BrokenPipeError:  # e.g. `ntsd query ... | head`: the reader left; not our failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
