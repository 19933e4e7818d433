"""The plugin interfaces: discovery, the lifecycle Protocol, metric descriptions, the direction of imports."""

from __future__ import annotations

import ast
from pathlib import Path

from nts.core.handler import RequestHandler
from nts.server.metrics import Descriptions, render
from nts.server.plugin import Plugin, discover, sections

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_plugins_are_discovered_with_their_sections() -> None:
    plugins = discover()
    assert set(plugins) == {"nts", "mac", "mssntp"}
    assert set(sections(plugins)) == {"nts", "mac", "mssntp"}


def test_every_plugin_has_the_lifecycle_members_and_answers_requests() -> None:
    members = {name for name in Plugin.__dict__ if not name.startswith("_")} | set(Plugin.__annotations__)
    members -= {"__init__"}
    for cls in discover().values():
        missing = sorted(name for name in members if not hasattr(cls, name))
        assert not missing, f"{cls.__name__} lacks {missing}"
        assert issubclass(cls, RequestHandler)


def test_metric_help_comes_from_its_owners() -> None:
    described = Descriptions.of((cls.COUNTERS, cls.GAUGES) for cls in discover().values())
    for counter in ("requests", "replies", "socket_errors", "nts_ke_sessions", "mac_requests", "mssntp_sign"):
        assert counter in described.counters
    for gauge in ("leap", "uptime_seconds", "nts_certificate_expiry_timestamp_seconds", "mac_ledger_entries"):
        assert gauge in described.gauges
    text = render({("nts_ke_sessions", "ok", "AES-128-GCM-SIV"): 2}, {}, described)
    assert "# HELP ntsd_nts_ke_sessions_total NTS-KE sessions" in text
    assert 'ntsd_nts_ke_sessions_total{outcome="ok",aead="AES-128-GCM-SIV"} 2' in text
    assert "# HELP ntsd_nts_ke_sessions_total" not in render({("nts_ke_sessions", "ok", "x"): 2}, {})  # not global


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules a source file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def test_imports_point_down_and_inwards() -> None:
    """The wire layer and the core import nothing of the shell, the CLI or the plugins; plugins import
    neither the shell nor each other."""
    outer = ("nts.server", "nts.cli", "nts.client", "nts.nts", "legacy", "mssntp")
    rules = {
        "nts/wire": (*outer, "nts.core", "nts.config"),
        "nts/core": (*outer, "nts.config"),
        "nts/nts": ("nts.server", "nts.cli", "nts.client", "legacy", "mssntp"),
        "legacy": ("nts.server", "nts.cli", "nts.client", "nts.nts", "mssntp"),
        "mssntp": ("nts.server", "nts.cli", "nts.client", "nts.nts", "legacy"),
    }
    broken = []
    for folder, forbidden in rules.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            for name in _imports(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert broken == []
