"""The request-path interface: what an authentication mode does for one datagram.

Strategy: every authentication mode (none, NTS, legacy MAC, MS-SNTP) answers requests through
this one small, fully typed interface, so the pipeline names none of them. The pipeline asks each
handler, in `order`, whether a request's shape is its (`matches`); the firmest claim wins and
builds the whole answer in `respond`, using the `ReplyContext` for the header so every mode shares
one notion of server state and time. `matches` may say more than yes or no: 1 means "the shape
fits", 2 "this is certainly mine" (a known key id, a client from the domain's networks); ties go to
the lower `order`. That is how a 68-byte request finds MD5 MAC or MS-SNTP, which look alike on the
wire. A handler may also offer `fast`: its common shape answered from the raw datagram, before the
pipeline splits fields and builds a Request. It must answer only what the general path would give
it (a claim of 2 that no handler asked earlier can match) and decide exactly as `respond` would;
anything else it returns None for, and the datagram takes the general path.
Settings, sockets, reloads and metrics are the shell's business: `nts.server.plugin.Plugin`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

from ..wire.extensions import ExtensionField
from ..wire.packet import Header, parse_header
from .decisions import Answer

Client = tuple[str, int]  # the peer's address and port, as the socket gave them


class Request:
    """A mode-3 request that got past the policy steps, with everything a handler may need.

    Not a wire structure but a pipeline object: the extension fields and trailer are split once;
    the header dataclass is only built if a handler asks for it (most need only the raw bytes).
    """

    __slots__ = ("_header", "client", "data", "extensions", "rx_ns", "trailer")

    def __init__(
        self, data: bytes, extensions: tuple[ExtensionField, ...], trailer: bytes, client: Client, rx_ns: int
    ) -> None:
        self.data, self.extensions, self.trailer = data, extensions, trailer
        self.client, self.rx_ns = client, rx_ns
        self._header: Header | None = None

    @property
    def header(self) -> Header:
        if self._header is None:
            self._header = parse_header(self.data)
        return self._header


class ReplyContext(Protocol):
    """What the core offers handlers for building answers: the server's state and the clock."""

    def reply_header(self, request: bytes, rx_ns: int, tx_delay_ns: int = 0) -> bytes:
        """The 48-byte mode-4 header for `request`; transmit time is now plus `tx_delay_ns` (a
        handler that knows its reply leaves later, after signing, says by how much)."""
        ...

    def kiss(self, request: bytes, code: bytes, rx_ns: int) -> bytes:
        """A 48-byte Kiss-o'-Death reply to `request`."""
        ...


class RequestHandler(ABC):
    """One authentication mode's request path."""

    name: ClassVar[str]  # metrics label (the `auth` of replies, naks, deferred)
    order: ClassVar[int] = 100  # lower is asked first
    bare: ClassVar[bool] = False  # answers bare 48-byte requests (the plain mode only)

    @abstractmethod
    def matches(self, request: Request) -> int:
        """How firmly this request is this mode's: 0 no, 1 the shape fits, 2 certainly (cheap)."""

    @abstractmethod
    def respond(self, request: Request, ctx: ReplyContext) -> Answer:
        """Verify, build and seal the answer (or return a Seal that builds it when it is sent)."""

    def fast(self, data: bytes, client: Client, rx_ns: int, ctx: ReplyContext) -> Answer | None:
        """Optional shortcut for this mode's common shape (see the module comment); None: not taken."""
        return None

    def fast_takes(self, length: int) -> bool:
        """Whether `fast` may take a datagram of this length (the pipeline asks once per length)."""
        return True
