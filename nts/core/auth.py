"""The authenticator interface and its registry.

Strategy: every authentication mode (none, NTS, legacy MAC, MS-SNTP) is a plugin behind one small
interface, registered under the entry-point group `ntsd.authenticators`, so `nts` names none of
them. The pipeline asks each enabled plugin, in `order`, whether a request's shape is its
(`matches`); the first that says yes builds the whole answer in `respond`, using the pipeline's
`ReplyContext` for the header so every mode shares one notion of server state and time.
A plugin's config section (`section`) is validated by the plugin itself through `parse_config`.
`matches` may say more than yes or no: 1 means "the shape fits", 2 "this is certainly mine" (a known
key id, a client from the domain's networks); the firmest claim wins, ties going to the lower
`order`. That is how a 68-byte request finds MD5 MAC or MS-SNTP, which look alike on the wire.
A plugin may also offer `fast`: its common shape answered from the raw datagram, before the
pipeline splits fields and builds a Request. It must answer only what the general path would give
it (a claim of 2 that no plugin asked earlier can match) and decide exactly as `respond` would;
anything else it returns None for, and the datagram takes the general path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..wire.extensions import ExtensionField
from ..wire.packet import Header, Packet, parse_header
from .decisions import Drop, Nak, Seal

if TYPE_CHECKING:
    from .decisions import Defer

ENTRY_POINT_GROUP = "ntsd.authenticators"


class Request:
    """A mode-3 request that got past the policy steps, with everything a plugin may need.

    Not a wire structure but a pipeline object: the extension fields and trailer are split once;
    the header dataclass is only built if a plugin asks for it (most need only the raw bytes).
    """

    __slots__ = ("_header", "client", "data", "extensions", "local", "rx_ns", "trailer")

    def __init__(
        self,
        data: bytes,
        extensions: tuple[ExtensionField, ...],
        trailer: bytes,
        client: tuple[str, int],
        rx_ns: int,
        local: object = None,
    ) -> None:
        self.data, self.extensions, self.trailer = data, extensions, trailer
        self.client, self.rx_ns, self.local = client, rx_ns, local
        self._header: Header | None = None

    @property
    def header(self) -> Header:
        if self._header is None:
            self._header = parse_header(self.data)
        return self._header

    @property
    def packet(self) -> Packet:
        return Packet(self.header, self.extensions, self.trailer)


class ReplyContext(Protocol):
    """What the pipeline offers plugins for building answers."""

    def reply_header(self, request: bytes, rx_ns: int, tx_delay_ns: int = 0) -> bytes:
        """The 48-byte mode-4 header for `request`; transmit time is now plus `tx_delay_ns` (a
        plugin that knows its reply leaves later, after signing, says by how much)."""
        ...

    def kiss(self, request: bytes, code: bytes, rx_ns: int) -> bytes:
        """A 48-byte Kiss-o'-Death reply to `request`."""
        ...


class Authenticator(ABC):
    """One authentication mode. Instances are built from the plugin's validated config section."""

    name: ClassVar[str]  # registry name and metrics label
    section: ClassVar[str | None] = None  # config section that enables it (None: always on)
    order: ClassVar[int] = 100  # lower is asked first
    bare: ClassVar[bool] = False  # answers bare 48-byte requests (the plain mode only)
    # Opens listening sockets of its own when built (see listen_addresses). With workers those are
    # bound once, before the workers start, and the workers share them; so there, enabling or
    # disabling such a plugin, or changing where it listens, takes a restart.
    listens: ClassVar[bool] = False
    may_bind = True  # set False by a worker's reload (build_authenticators): keep the sockets as they are

    @classmethod
    def listen_addresses(cls, settings: Any) -> tuple[tuple[str, int], ...]:
        """Where a plugin that `listens` listens with these settings."""
        return ()

    @classmethod
    def restart_only(cls, running: Any, new: Any) -> list[str]:
        """The settings (as "section.name") changed from `running` to `new` that a reload cannot
        apply: the plugin keeps the running ones, and the main process names them once."""
        return []

    @classmethod
    def parse_config(cls, node: Any) -> Any:
        """Validate this plugin's config section (an nts.config.Node); raise ConfigError with a location."""
        return node

    @abstractmethod
    def matches(self, request: Request) -> int:
        """How firmly this request is this mode's: 0 no, 1 the shape fits, 2 certainly (cheap)."""

    @abstractmethod
    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak | Drop | Defer | Seal:
        """Verify, build and seal the answer (or return a Seal that builds it when it is sent)."""

    def fast(
        self, data: bytes, client: tuple[str, int], rx_ns: int, ctx: ReplyContext
    ) -> bytes | Nak | Drop | Seal | None:
        """Optional shortcut for this mode's common shape (see the module comment); None: not taken."""
        return None

    def fast_takes(self, length: int) -> bool:
        """Whether `fast` may take a datagram of this length (the pipeline asks once per length)."""
        return True

    async def complete(self, job: object) -> bytes | None:
        """Finish a deferred reply (asynchronous signers only)."""
        raise NotImplementedError

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Start background services (listeners, signer connections) on the running loop."""

    async def stop(self) -> None:  # noqa: B027 (optional hook)
        """Stop what start() started."""

    @classmethod
    def check(cls, settings: Any) -> list[tuple[bool, str]]:
        """For `ntsd check-config`: (is_error, message) for what would keep the plugin from starting
        with `settings` (errors) or what it would warn about, found without binding sockets or
        creating anything."""
        return []

    def reconfigure(self, config: Any) -> bool:
        """Apply a reloaded config section in place; False means "replace me with a new instance"."""
        return False

    def counters(self) -> Mapping[tuple[str, ...], int]:
        """The plugin's own counters (those of its background services), for the metrics."""
        return {}

    def gauges(self) -> Mapping[str, float]:
        """The plugin's own gauges (e.g. a certificate's expiry), for the metrics."""
        return {}

    def reports(self) -> Mapping[str, Any]:
        """Named JSON-ready reports served by the metrics endpoint at /report/NAME (e.g. clients)."""
        return {}

    def close(self) -> None:  # noqa: B027 (an optional hook; most plugins hold nothing)
        """Release resources (sockets, files) at shutdown or after a reload replaced it."""


class PluginError(Exception):
    """A plugin cannot start with its configuration (missing certificate, unusable key, ...)."""


def discover() -> dict[str, type[Authenticator]]:
    """All installed authenticator plugins by name."""
    found: dict[str, type[Authenticator]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Authenticator)):
            raise TypeError(f"entry point {ep.name!r} is not an Authenticator")
        found[cls.name] = cls
    return found
