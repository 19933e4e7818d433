"""The plugin lifecycle interface, and plugin discovery.

Strategy: a plugin is a class registered under the entry-point group `ntsd.plugins` that the shell
builds from its validated config section, starts on the event loop, reconfigures on reload,
asks for metrics and closes. It describes that life through `Plugin`, a Protocol: plugins
(`nts.nts`, `legacy`, `mssntp`) implement it without importing the shell, as imports point
inwards. What a plugin does for one datagram is the core's `RequestHandler`; a plugin that answers
requests is also one (every plugin here is), and the shell puts it in the pipeline. Config sections
are the discovered plugins' (`sections`): a third-party plugin brings its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from ..config import Node
from ..core.policy import Shared
from ..core.stats import CounterHelp, GaugeHelp, SeriesHelp

ENTRY_POINT_GROUP = "ntsd.plugins"


class Plugin(Protocol):
    """One plugin's life in the server. Built from its settings (`cls(settings)`), which may raise
    `nts.config.PluginError`: everything privileged or fallible happens there, before privileges
    are dropped and workers are forked."""

    name: ClassVar[str]  # registry name; also the handler's metrics label
    section: ClassVar[str]  # the config section that enables it
    # Opens listening sockets of its own when built (see listen_addresses). With workers those are
    # bound once, before the workers start, and the workers share them; so there, enabling or
    # disabling such a plugin, or changing where it listens, takes a restart.
    listens: ClassVar[bool]
    # counter -> (label names, help text) and gauge -> help text, for the metrics endpoint
    COUNTERS: ClassVar[CounterHelp]
    GAUGES: ClassVar[GaugeHelp]
    SERIES: ClassVar[SeriesHelp]  # counter -> label values shown at zero from the start
    may_bind: bool  # set False by a worker's reload: keep the sockets as they are

    def __init__(self, settings: Any) -> None: ...

    @classmethod
    def parse_config(cls, node: Node) -> Any:
        """Validate the plugin's section; raise ConfigError with a location."""
        ...

    @classmethod
    def check(cls, settings: Any) -> list[tuple[bool, str]]:
        """For `ntsd check-config`: (is_error, message) for what would keep the plugin from starting
        with `settings` (errors) or what it would warn about, found without binding sockets or
        creating anything."""
        ...

    @classmethod
    def describe(cls, settings: Any) -> list[str]:
        """For `ntsd check-config`'s summary: what the section sets up, a line each (where it
        listens, the certificate's subject and expiry, how many keys of which kind...)."""
        ...

    @classmethod
    def listen_addresses(cls, settings: Any) -> tuple[tuple[str, int], ...]:
        """Where a plugin that `listens` listens with these settings."""
        ...

    @classmethod
    def restart_only(cls, running: Any, new: Any) -> list[str]:
        """The settings (as "section.name") changed from `running` to `new` that a reload cannot
        apply: the plugin keeps the running ones, and the main process names them once."""
        ...

    def share(self, shared: Shared) -> None:
        """The server's access lists and worker count, given before start and after every reload,
        for what the plugin serves outside the pipeline (NTS-KE connections) and for budgets meant
        for the whole server, which each worker enforces its share of."""
        ...

    async def start(self) -> None:
        """Start background services (listeners, signer connections) on the running loop."""
        ...

    async def stop(self) -> None:
        """Stop what start() started."""
        ...

    def reconfigure(self, settings: Any) -> bool:
        """Apply a reloaded section in place; False means "replace me with a new instance"."""
        ...

    def counters(self) -> Mapping[tuple[str, ...], int]:
        """The plugin's own counters (those of its background services)."""
        ...

    def gauges(self) -> Mapping[str, float]:
        """The plugin's own gauges (e.g. a certificate's expiry)."""
        ...

    def reports(self) -> Mapping[str, Any]:
        """Named JSON-ready reports served by the metrics endpoint at /report/NAME (e.g. clients)."""
        ...

    def close(self) -> None:
        """Release resources (sockets, files) at shutdown or after a reload replaced it."""
        ...


def discover() -> dict[str, type[Plugin]]:
    """All installed plugins by name."""
    found: dict[str, type[Plugin]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls: type[Plugin] = ep.load()
        if not (isinstance(cls, type) and isinstance(getattr(cls, "section", None), str)):
            raise TypeError(f"entry point {ep.name!r} is not an ntsd plugin")
        found[cls.name] = cls
    return found


def sections(plugins: Mapping[str, type[Plugin]]) -> dict[str, type[Plugin]]:
    """The config sections the plugins bring, each to its plugin."""
    return {cls.section: cls for cls in plugins.values()}
