"""Which plugins a reload builds, keeps or retires, and which changes the main process says need a restart."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

from nts.core.decisions import Drop
from nts.core.handler import Request, RequestHandler
from nts.server.daemon import restart_only_changes
from nts.server.serving import build_plugins


class Listening(RequestHandler):
    """A plugin with listening sockets of its own, as NTS has."""

    name: ClassVar[str] = "listening"
    section: ClassVar[str] = "listening"
    listens: ClassVar[bool] = True

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @classmethod
    def listen_addresses(cls, settings: Any) -> tuple[tuple[str, int], ...]:
        return tuple(settings["listen"])

    @classmethod
    def restart_only(cls, running: Any, new: Any) -> list[str]:
        return ["listening.store"] if running.get("store") != new.get("store") else []

    def reconfigure(self, config: Any) -> bool:
        self.settings = config
        return True

    def matches(self, request: Request) -> int:
        return 0

    def respond(self, request: Request, ctx: Any) -> Drop:
        return Drop("unused")


PLUGINS: dict[str, Any] = {"listening": Listening}


def config(section: dict[str, Any] | None, workers: int = 2, batch: int = 32, hw: tuple[str, ...] = ()) -> Any:
    ntp = SimpleNamespace(
        workers=workers, listen=(("127.0.0.1", 123),), user=None, group=None, batch=batch, hwtimestamp=hw
    )
    return SimpleNamespace(
        ntp=ntp, metrics_listen=None, metrics_reports=False, plugins={} if section is None else {"listening": section}
    )


ON = {"listen": [("127.0.0.1", 4460)]}


def test_a_worker_neither_builds_nor_retires_a_listening_plugin() -> None:
    assert build_plugins(config(ON), PLUGINS, [], may_bind=False) == ([], [])
    running = Listening(ON)
    assert build_plugins(config(None), PLUGINS, [running], may_bind=False) == ([running], [])
    moved = {"listen": [("127.0.0.1", 4461)]}
    assert build_plugins(config(moved), PLUGINS, [running], may_bind=False) == ([running], [])
    assert running.settings is moved  # reconfigured in place (the plugin keeps its sockets itself)


def test_a_single_process_builds_and_retires_it() -> None:
    built, retired = build_plugins(config(ON, 1), PLUGINS, [])
    assert [type(a) for a in built] == [Listening] and retired == []
    assert build_plugins(config(None, 1), PLUGINS, built) == ([], built)


def test_with_workers_its_listening_changes_need_a_restart() -> None:
    moved = {"listen": [("127.0.0.1", 4461)]}
    assert restart_only_changes(config(None), config(ON), PLUGINS) == ["listening (enabled)"]
    assert restart_only_changes(config(ON), config(None), PLUGINS) == ["listening (disabled)"]
    assert restart_only_changes(config(ON), config(moved), PLUGINS) == ["listening.listen"]
    assert restart_only_changes(config(ON), config({"listen": [("127.0.0.1", 4460)], "x": 1}), PLUGINS) == []
    assert restart_only_changes(config(ON, 1), config(moved, 1), PLUGINS) == []  # one process rebinds


def test_what_plugins_and_the_batch_size_keep_until_a_restart_is_named_in_any_process_count() -> None:
    stored = {**ON, "store": "/elsewhere"}
    for workers in (1, 2):
        assert restart_only_changes(config(ON, workers), config(stored, workers), PLUGINS) == ["listening.store"]
        assert restart_only_changes(config(ON, workers), config(ON, workers, batch=8), PLUGINS) == ["ntp.batch"]
        assert restart_only_changes(config(ON, workers), config(ON, workers, hw=("eth0",)), PLUGINS) == [
            "ntp.hwtimestamp"
        ]
    assert restart_only_changes(config(None, 1), config(stored, 1), PLUGINS) == []  # enabled: built anew


def test_the_privilege_drop_keeps_the_users_groups_and_refuses_a_group_alone(monkeypatch: Any, caplog: Any) -> None:
    """setgroups([gid]) dropped the supplementary groups (a key shared through ssl-cert became
    unreadable after its renewal); a group without a user kept uid 0; serving as root said nothing."""
    import os
    import pwd

    from nts.config import ConfigError, parse_config
    from nts.server import daemon

    calls: list[tuple[str, tuple[Any, ...]]] = []
    for name in ("initgroups", "setgroups", "setgid", "setuid"):
        monkeypatch.setattr(daemon.os, name, lambda *a, _n=name: calls.append((_n, a)))
    nobody = pwd.getpwnam("nobody")
    daemon.drop_privileges("nobody", None)
    assert calls == [("initgroups", ("nobody", nobody.pw_gid)), ("setgid", (nobody.pw_gid,)),
                     ("setuid", (nobody.pw_uid,))]  # fmt: skip
    try:
        parse_config("ntp: {group: nogroup}\n", "c.yaml")
    except ConfigError as exc:
        assert str(exc) == "c.yaml:1: ntp.group: a group without ntp.user would keep uid 0 (root); set ntp.user too"
    else:
        raise AssertionError("a group alone was accepted")
    if os.geteuid() == 0:
        daemon.drop_privileges(None, None)
        assert "running as root: set ntp.user" in caplog.text
