"""YAML configuration, validated on load, with errors that name file, line and key.

Strategy: PyYAML's safe composer yields a node tree that keeps each value's line; `Node` wraps it so
validators read typed values and raise `ConfigError` pointing at the offending line. Each section
becomes a frozen settings object through `read_settings`: a table of key -> reader, the defaults
being the dataclass's own; unknown keys are errors (typos must not pass silently). Sections owned
by plugins (`nts`, `mac`, `mssntp`, or a third party's) are named by the plugins the caller passes
and validated by the plugins themselves, with the same helpers.
The embedded default serves plain NTP on loopback so the daemon runs with no file at all.
"""

from __future__ import annotations

import grp
import hashlib
import ipaddress
import logging
import os
import pwd
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PosixPath
from typing import Any, Protocol, TypeVar

import yaml

from .core.clockstate import ClockSettings
from .core.policy import Network, RateSettings
from .files import default_dir
from .net import format_addr

DEFAULT_CONFIG = """\
# ntsd embedded default: NTP and NTS on loopback, metrics on loopback. Its relative paths are
# resolved against ntsd's default directory (/var/lib/ntsd for root, else ~/.local/state/ntsd;
# NTSD_DIR overrides), never against the working directory.
ntp:
  listen: ["127.0.0.1:123", "[::1]:123"]
  workers: 1
access:
  allow: []
  deny: []
  deny_action: kod
rate_limit:
  enabled: true
clock:
  stratum: 2
  reference_id: 127.0.0.1   # the kernel clock, disciplined by a daemon on this host
  local_reference: false
log:
  level: info
metrics:
  listen: "127.0.0.1:9975"
nts:
  listen: ["127.0.0.1:4460", "[::1]:4460"]
  certificate: server.pem   # made by `ntsd certs`
  private_key: server.key
  key_dir: .                # the NTS master secret is kept here (mode 0600)
"""

MAX_CONFIG = 1 << 20  # characters


class ConfigError(Exception):
    """A configuration problem at a known place: str() is 'FILE:LINE: KEY: message'."""

    def __init__(self, source: str, line: int | None, key: str, message: str) -> None:
        self.source, self.line, self.key, self.message = source, line, key, message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class PluginError(Exception):
    """A plugin cannot start with its (valid) settings: a missing certificate, an unusable key..."""


class ConfigPath(PosixPath):
    """A path from the configuration that remembers where it was set, for errors about the file."""

    where = ""  # 'FILE:LINE: KEY'


def located(key: str, message: str, *paths: Path) -> str:
    """`message` about a file, prefixed with the config location (FILE:LINE: KEY) of the first of
    `paths` it names (the first of them when it names none), or with `key` when it has none."""
    named = [p for p in paths if str(p) in message] or list(paths)
    where = getattr(named[0], "where", "") if named else ""
    return f"{where or key}: {message}"


class Node:
    """A YAML node with its location, for validators; `base` is where relative paths start."""

    __slots__ = ("base", "key", "key_line", "node", "source")

    def __init__(
        self, node: yaml.Node | None, source: str, key: str, key_line: int | None = None, base: Path | None = None
    ) -> None:
        self.node, self.source, self.key, self.key_line = node, source, key, key_line
        self.base = base if base is not None else Path.cwd()

    @property
    def line(self) -> int | None:
        return self.node.start_mark.line + 1 if self.node is not None else None

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.source, self.line, self.key, message)

    @property
    def is_null(self) -> bool:
        return self.node is None or (isinstance(self.node, yaml.ScalarNode) and self.node.tag.endswith(":null"))

    def mapping(self, allowed: tuple[str, ...] | None = None) -> dict[str, Node]:
        if self.is_null:
            return {}
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error("expected a mapping of keys to values")
        out: dict[str, Node] = {}
        for knode, vnode in self.node.value:
            name = knode.value if isinstance(knode, yaml.ScalarNode) else None
            child_key = f"{self.key}.{name}" if self.key else str(name)
            if not isinstance(name, str) or not name:
                raise ConfigError(self.source, knode.start_mark.line + 1, self.key, "keys must be plain names")
            if name in out:
                raise ConfigError(self.source, knode.start_mark.line + 1, child_key, "duplicate key")
            if allowed is not None and name not in allowed:
                raise ConfigError(
                    self.source,
                    knode.start_mark.line + 1,
                    child_key,
                    f"unknown key (expected one of: {', '.join(allowed)})",
                )
            out[name] = Node(vnode, self.source, child_key, knode.start_mark.line + 1, self.base)
        return out

    def items(self) -> list[Node]:
        if self.is_null:
            return []
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error("expected a list")
        return [Node(v, self.source, f"{self.key}[{i}]", None, self.base) for i, v in enumerate(self.node.value)]

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error("expected a single value")
        try:
            return _construct(self.node)
        except (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError) as exc:
            # an unknown tag (!!foo 2), or a value its tag cannot hold (!!int abc, 2001-02-30 as a date)
            short = (
                "!!" + self.node.tag.rsplit(":", 1)[-1] if self.node.tag.startswith("tag:yaml.org") else self.node.tag
            )
            if isinstance(exc, yaml.YAMLError):
                raise self.error(f"unsupported YAML tag {short}") from None
            raise self.error(f"{self.node.value!r} is not a valid {short} (quote it if it is text)") from None

    def string(self) -> str:
        value = self.scalar()
        if not isinstance(value, str) or not value:
            raise self.error("expected a non-empty string")
        return value

    def path(self) -> ConfigPath:
        """A file or directory name; a relative one is taken from the configuration file's directory."""
        out = ConfigPath(os.path.normpath(self.base / self.string()))
        out.where = f"{self.source}:{self.line}: {self.key}"
        return out

    def boolean(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            raise self.error("expected true or false")
        return value

    def integer(self, lo: int, hi: int) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(f"expected a whole number from {lo} to {hi}")
        return value

    def number(self, lo: float, hi: float) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise self.error(f"expected a number from {lo:g} to {hi:g}")
        return float(value)

    def choice(self, *options: str) -> str:
        value = self.scalar()
        if value not in options:
            raise self.error(f"expected one of: {', '.join(options)}")
        return str(value)

    def network(self) -> Network:
        text = self.string() if not isinstance(self.scalar(), int) else str(self.scalar())
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise self.error(f"{text!r} is not an IP address or CIDR network") from None
        if "/" in text and network.network_address != ipaddress.ip_interface(text).ip:
            one = f"{ipaddress.ip_interface(text).ip}/{network.max_prefixlen}"
            raise self.error(f"{text!r} has host bits set: write {network} for the network, or {one} for one address")
        return network

    def address(self, default_port: int | None = None) -> tuple[str, int]:
        return parse_hostport(self, self.string(), default_port)


def _construct(node: yaml.ScalarNode) -> Any:
    """The Python value of a scalar node, by the safe loader's own tag rules."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


class Where(Protocol):
    """Anything that can turn a message into a located ConfigError (a Node, the command line)."""

    def error(self, message: str) -> ConfigError: ...


def parse_hostport(where: Where, text: str, default_port: int | None) -> tuple[str, int]:
    """'127.0.0.1:123', '[::1]:123', or a bare address when a default port is given."""
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            raise where.error(f"{text!r}: IPv6 addresses are written [ADDRESS]:PORT")
        host, port_text = text[1:end], text[end + 2 :] if end + 1 < len(text) else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise where.error(f"{text!r}: {host!r} is not an IP address") from None
    if port_text is None:
        if default_port is None:
            raise where.error(f"{text!r}: a port is required (ADDRESS:PORT, or [ADDRESS]:PORT for IPv6)")
        return str(ip), default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise where.error(f"{text!r}: port must be 1 to 65535")
    return str(ip), int(port_text)


Reader = Callable[[Node], Any]
S = TypeVar("S")


def read_settings(
    node: Node, cls: Callable[..., S], readers: Mapping[str, Reader], fields: Mapping[str, str | None] | None = None
) -> S:
    """`cls` built from the keys of mapping `node` that `readers` knows, each read by its reader
    into the field of the same name (or the one `fields` names for it: None, checked but not
    passed); keys left out take the class's defaults. Any other key is an error that names it."""
    m = node.mapping(tuple(readers))
    fields = fields or {}
    values = {fields.get(key, key): read(m[key]) for key, read in readers.items() if key in m}
    return cls(**{name: value for name, value in values.items() if name is not None})


def integer(lo: int, hi: int) -> Reader:
    return lambda n: n.integer(lo, hi)


def number(lo: float, hi: float) -> Reader:
    return lambda n: n.number(lo, hi)


def choice(*options: str) -> Reader:
    return lambda n: n.choice(*options)


def optional(read: Reader) -> Reader:
    """`read`, or None for an explicit null (`key: ~`)."""
    return lambda n: None if n.is_null else read(n)


def listof(read: Reader) -> Reader:
    return lambda n: tuple(read(item) for item in n.items())


def string(n: Node) -> str:
    return n.string()


def boolean(n: Node) -> bool:
    return n.boolean()


def path(n: Node) -> Path:
    return n.path()


def network(n: Node) -> Network:
    return n.network()


def address(n: Node) -> tuple[str, int]:
    return n.address()


@dataclass(frozen=True, slots=True)
class NtpSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 123), ("::1", 123))
    workers: int = 1
    batch: int = 32  # datagrams per recvmmsg/sendmmsg call (1: one syscall per datagram)
    max_hold_us: int = 20  # how long a finished reply may wait for others to share its send call
    correct_transmit: bool = True  # basic replies' transmit time moved on by the measured lag to the send
    hwtimestamp: tuple[str, ...] = ()  # interfaces whose hardware timestamps are used ("*": all that have them)
    user: str | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class AccessSettings:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    deny_kod: bool = True
    require_auth: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: int = logging.INFO
    file: str | None = None
    format: str = "text"  # text (under systemd: journald's priorities, no time), or json


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    ntp: NtpSettings
    access: AccessSettings = field(default_factory=AccessSettings)
    rate_limit: RateSettings | None = field(default_factory=RateSettings)
    clock: ClockSettings = field(default_factory=ClockSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9975)
    metrics_reports: bool = False  # /report/NAME (client addresses, key ids) on the metrics endpoint
    warnings: tuple[str, ...] = ()  # what the file does that its author may not expect (logged, shown)
    plugins: Mapping[str, Any] = field(default_factory=dict)


def _known(lookup: Callable[[str], object], what: str) -> Reader:
    """A name that `lookup` (pwd.getpwnam, grp.getgrnam) knows on this host."""

    def read(node: Node) -> str:
        name = node.string()
        try:
            lookup(name)
        except KeyError:
            raise node.error(f"no such {what} {name!r} on this host") from None
        return name

    return read


_NTP: dict[str, Reader] = {
    "listen": listof(address),
    "workers": integer(1, 64),
    "batch": integer(1, 1024),
    "max_hold_us": integer(0, 100_000),
    "correct_transmit": boolean,
    "hwtimestamp": listof(string),
    "user": optional(_known(pwd.getpwnam, "user")),
    "group": optional(_known(grp.getgrnam, "group")),
}


def _ntp(node: Node) -> NtpSettings:
    settings = read_settings(node, NtpSettings, _NTP)
    if settings.group is not None and settings.user is None:
        raise node.mapping()["group"].error("a group without ntp.user would keep uid 0 (root); set ntp.user too")
    where = node.mapping().get("listen", node)
    if not settings.listen:
        raise where.error("at least one listen address is required")
    if len(set(settings.listen)) != len(settings.listen):
        raise where.error("the same address is listed twice")
    return settings


_KOD_OR_IGNORE = choice("kod", "ignore")
_ACCESS: dict[str, Reader] = {
    "allow": listof(network),
    "deny": listof(network),
    "deny_action": lambda n: _KOD_OR_IGNORE(n) == "kod",
    "require_auth": listof(network),
}


def _access(node: Node) -> AccessSettings:
    return read_settings(node, AccessSettings, _ACCESS, {"deny_action": "deny_kod"})


def _rate_limit(node: Node) -> RateSettings | None:
    enabled = node.mapping().get("enabled")
    if enabled is not None and not enabled.boolean():
        return None
    return read_settings(node, RateSettings, _RATE, {"action": "kod", "enabled": None})


_RATE: dict[str, Reader] = {
    "enabled": boolean,
    "rate": number(0.001, 1e6),
    "burst": integer(1, 1_000_000),
    "max_clients": integer(16, 10_000_000),
    "action": lambda n: _KOD_OR_IGNORE(n) == "kod",
    "kod_interval": number(0, 3600),
}


def _reference_id(node: Node) -> bytes:
    """RFC 5905 section 7.3: at stratum 2 and above the upstream server's IPv4 address, or the first
    four octets of the MD5 of its IPv6 address; at stratum 1 a four-character source name."""
    text = str(node.scalar())
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return (
            address.packed if address.version == 4 else hashlib.md5(address.packed, usedforsecurity=False).digest()[:4]
        )
    if not 1 <= len(text) <= 4 or not text.isascii() or not text.isprintable():
        raise node.error("expected an IPv4 or IPv6 address, or 1 to 4 printable ASCII characters")
    return text.encode().ljust(4, b"\0")


def _refid_warning(top: Mapping[str, Node], clock: ClockSettings) -> str | None:
    """A source name (GPS, LOCL) at stratum 2 or above, where clients expect an address."""
    node = top["clock"].mapping().get("reference_id") if "clock" in top else None
    if node is None or clock.stratum < 2:
        return None
    try:
        ipaddress.ip_address(str(node.scalar()))
    except ValueError:
        return (f"{node.source}:{node.line}: clock.reference_id: {node.scalar()!r} is a source name, which RFC 5905 "
                f"keeps for stratum 1; at stratum {clock.stratum} give the upstream server's address (clients "
                "compare it with their own to detect timing loops)")  # fmt: skip
    return None


_CLOCK: dict[str, Reader] = {
    "stratum": integer(1, 15),
    "reference_id": _reference_id,
    "local_reference": boolean,
    "root_delay": number(0, 16),
    "root_dispersion": number(0, 16),
}


def _clock(node: Node) -> ClockSettings:
    return read_settings(node, ClockSettings, _CLOCK)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _level(node: Node) -> int:
    value = node.scalar()
    if isinstance(value, str) and value.lower() in _LEVELS:  # INFO as well as info
        return _LEVELS[value.lower()]
    raise node.error(f"expected one of: {', '.join(_LEVELS)}")


def _log_file(node: Node) -> str:
    name = str(node.path())
    directory = os.path.dirname(name)
    if not os.path.isdir(directory):
        raise node.error(f"{directory} does not exist (the log file's directory)")
    return name


_LOG: dict[str, Reader] = {"level": _level, "file": optional(_log_file), "format": choice("text", "json")}


def _log(node: Node) -> LogSettings:
    return read_settings(node, LogSettings, _LOG)


def _metrics(node: Node) -> tuple[tuple[str, int] | None, bool]:
    """(where the endpoint listens, None: nowhere; whether it serves /report/NAME)."""
    m = node.mapping(("listen", "reports"))
    listen = None if "listen" not in m or m["listen"].is_null else m["listen"].address()
    return listen, m["reports"].boolean() if "reports" in m else False


_SECTIONS: dict[str, Callable[[Node], Any]] = {
    "ntp": _ntp,
    "access": _access,
    "rate_limit": _rate_limit,
    "clock": _clock,
    "log": _log,
    "metrics": _metrics,
}


def parse_config(text: str, source: str, plugins: Mapping[str, Any] | None = None, base: Path | None = None) -> Config:
    """Validate YAML `text`. `plugins` maps section name -> class with parse_config(Node). Relative
    paths start from `base` (default: the directory of `source`)."""
    if base is None:
        base = Path(os.path.abspath(source)).parent
    plugins = plugins or {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, line, "", f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, None, "", f"not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(source, None, "", "not a usable config: collections nested too deeply") from None
    top = Node(root, source, "", None, base).mapping()
    for name, node in top.items():
        if name not in _SECTIONS and name not in plugins:
            known = ", ".join((*_SECTIONS, *plugins))
            raise ConfigError(source, node.key_line, name, f"unknown section: no installed plugin provides it "
                              f"(sections: {known})")  # fmt: skip
    values: dict[str, Any] = {}
    for name, fn in _SECTIONS.items():
        if name in top:
            values[name] = fn(top[name])
    if "ntp" not in values:
        values["ntp"] = _ntp(Node(None, source, "ntp", None, base))
    plugin_values: dict[str, Any] = {}
    for name, plugin in plugins.items():
        if name in top:
            plugin_values[name] = plugin.parse_config(top[name])
    warnings = []
    refid = _refid_warning(top, values.get("clock", ClockSettings()))
    if refid is not None:
        warnings.append(refid)
    if not top:
        warnings.append("the file sets nothing: ntsd serves plain NTP only, on 127.0.0.1:123 and [::1]:123, "
                        "without NTS (the embedded default is used only when no file is named)")  # fmt: skip
    return Config(
        warnings=tuple(warnings),
        source=source,
        ntp=values["ntp"],
        access=values.get("access", AccessSettings()),
        rate_limit=values.get("rate_limit", RateSettings()),
        clock=values.get("clock", ClockSettings()),
        log=values.get("log", LogSettings()),
        metrics_listen=values["metrics"][0] if "metrics" in values else ("127.0.0.1", 9975),
        metrics_reports=values["metrics"][1] if "metrics" in values else False,
        plugins=plugin_values,
    )


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def load_config(path: str | None, plugins: Mapping[str, Any] | None = None) -> Config:
    """Read and validate `path` (or the embedded default when None)."""
    if path is None:
        if _has_ipv6_loopback():
            return parse_config(DEFAULT_CONFIG, "<default>", plugins, default_dir())
        # a host (or container) without IPv6: the embedded default serves IPv4 only rather than fail
        ipv4_only = DEFAULT_CONFIG.replace(', "[::1]:123"', "").replace(', "[::1]:4460"', "")
        return parse_config(ipv4_only, "<default, IPv4 only: this host has no ::1>", plugins, default_dir())
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise ConfigError(path, None, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "", "not UTF-8 text") from None
    if len(text) > MAX_CONFIG:  # never parse a cut file: its tail (a deny list, say) would be lost quietly
        raise ConfigError(path, None, "", f"larger than {MAX_CONFIG} characters; not a configuration file")
    return parse_config(text, path, plugins)


def iter_lines(config: Config) -> Iterator[str]:
    """A human summary for logs and check-config."""
    yield (
        f"ntp listen: {', '.join(format_addr(a) for a in config.ntp.listen)} (workers {config.ntp.workers}, "
        f"batch {config.ntp.batch}, max hold {config.ntp.max_hold_us} us)"
    )
    if config.metrics_listen:
        reports = "; reports at /report/NAME" if config.metrics_reports else ""
        yield f"metrics: http://{format_addr(config.metrics_listen)}/metrics{reports}"
    access = config.access
    if access.allow or access.deny or access.require_auth:
        yield (f"access: allow {', '.join(map(str, access.allow)) or 'all'}; deny "
               f"{', '.join(map(str, access.deny)) or 'none'}; authentication required from "
               f"{', '.join(map(str, access.require_auth)) or 'none'}")  # fmt: skip
    clock = config.clock
    yield (f"clock: stratum {clock.stratum} while the kernel clock is synchronised"
           f"{' (or not: local_reference)' if clock.local_reference else ''}")  # fmt: skip
    if config.log.file:
        yield f"log: {config.log.file} ({config.log.format})"
    yield f"sections: {', '.join(config.plugins) or 'none (plain NTP only)'}"
