"""The daemon: binds sockets, runs the pipeline, reloads on SIGHUP, stops cleanly on SIGTERM/SIGINT.

Strategy: everything privileged happens first (bind every socket, for every worker), then the
process optionally drops to an unprivileged user. With `workers > 1` the parent forks that many
children that share the listen ports through SO_REUSEPORT; each child publishes a snapshot of its
counters to a shared memory slot every second and the parent serves their sum as metrics. A reload
validates the new file first and keeps the running configuration when it is broken; sockets whose
addresses did not change are kept, so no packet is lost across a reload. Parent and workers watch
each other: a worker that dies stops the parent (exit 1, for the service manager), and workers
whose parent was killed outright stop within a second instead of holding the ports as orphans.
The parent reports a reload done (its log line, READY=1 to systemd) once every worker has applied
it, so `systemctl reload` returns when the new configuration is in force everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

from .. import __version__, files
from ..config import Config, ConfigError, PluginError, load_config
from ..logutil import CONTEXT, LINES, formatter
from ..net import format_addr, open_tcp_listener
from . import hwstamp, runtime
from .kernelclock import measure_precision
from .metrics import Descriptions, MetricsServer, build_info, render_process, zero_series
from .plugin import Plugin, discover, sections
from .procstats import process_metrics
from .serving import Server, build_plugins
from .shared import SharedCounters
from .steering import steer_by_source
from .udp import open_udp_socket

__all__ = ["Daemon", "StartupError", "trust_service_user"]

log = logging.getLogger("ntsd")

STATE_INTERVAL = 1.0  # seconds between kernel clock reads
_HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
WORKER_STOP_S = 5.0  # how long a stop waits for each worker before killing it
_PUBLISHES_PER_STATE = 5  # a worker's counters reach the supervisor's metrics every 0.2 s
RELOAD_WAIT_S = 10.0  # how long the parent waits for the workers to finish a reload before saying it is done


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def bind_all(config: Config, copies: int, hardware: bool = False) -> list[dict[tuple[str, int], socket.socket]]:
    """Bind every listen address `copies` times (SO_REUSEPORT when more than one); `hardware`: the
    sockets ask for hardware timestamps too."""
    sets: list[dict[tuple[str, int], socket.socket]] = [{} for _ in range(copies)]
    try:
        for addr in config.ntp.listen:
            for i in range(copies):
                sets[i][addr] = open_udp_socket(*addr, reuse_port=copies > 1, hardware=hardware)
            if copies > 1:
                try:  # each client address to one worker, so per-client limits are the whole server's
                    steer_by_source(sets[0][addr], copies)
                except OSError as exc:
                    log.warning("cannot steer clients to workers by address on %s (%s): per-client limits "
                                "apply per worker", format_addr(addr), exc.strerror)  # fmt: skip
    except OSError as exc:
        for s in sets:
            for sock in s.values():
                sock.close()
        hint = ""
        if exc.errno in (13, 1) and addr[1] < 1024:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or set ntp.listen to a higher port)"
        elif exc.errno == 98:
            hint = " (another NTP server is probably running on it)"
        elif exc.errno == 99:
            hint = " (no such local address on this host)"
        raise StartupError(f"cannot listen on {format_addr(addr)}: {exc.strerror}{hint}") from None
    return sets


def raise_fd_limit() -> None:
    """Let the process hold as many descriptors as it may (the soft limit up to the hard one, at
    most 2**20): NTS-KE holds one per connection that has not spoken yet, so a flood of idle
    connections is held instead of closed and reopened. Under the systemd unit, LimitNOFILE sets it
    (the unit forbids the call)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the descriptor limit from %d: %s", soft, exc)


def trust_service_user(config: Config) -> None:
    """Secret files may belong to the user the server drops its privileges to (ntp.user), files the
    server creates before the drop are handed to that user, and secrets it could not read after
    the drop are refused at start (and by check-config)."""
    if config.ntp.user:
        with contextlib.suppress(KeyError):  # (an unknown user is refused by drop_privileges)
            pw = pwd.getpwnam(config.ntp.user)
            gid = grp.getgrnam(config.ntp.group).gr_gid if config.ntp.group else pw.pw_gid
            files.set_service_user(config.ntp.user, pw.pw_uid, gid)


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become `user` (with its supplementary groups, as a login would: a key shared through a group
    such as ssl-cert stays readable), primary group `group` or the user's. A group alone is refused
    by the configuration (it would keep uid 0); no user at all, as root, is warned about."""
    if user is None:
        if os.geteuid() == 0:
            log.warning("running as root: set ntp.user (and open ports below 1024 before the drop, as ntsd "
                        "does) so that a flaw in ntsd cannot be one in the whole host")  # fmt: skip
        return
    try:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError as exc:
        raise StartupError(f"cannot drop privileges: no such user or group {exc.args[0]}") from None
    try:
        os.initgroups(user, gid)
        os.setgid(gid)
        os.setuid(pw.pw_uid)
    except PermissionError:
        raise StartupError("cannot drop privileges: not running as root") from None
    log.info("running as user %s, group %s (and its groups: %s)", user, group or gid,
             ", ".join(str(g) for g in os.getgroups()) or "none")  # fmt: skip


def setup_logging(config: Config) -> None:
    """Log where `config` says. StartupError if its file cannot be opened (logging stays as it was)."""
    handler: logging.Handler
    try:
        handler = logging.FileHandler(config.log.file) if config.log.file else logging.StreamHandler(sys.stderr)
    except OSError as exc:
        raise StartupError(f"cannot open the log file {config.log.file}: {exc.strerror}") from None
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if h is not LINES:
            h.close()
    handler.setFormatter(formatter(config.log.format, to_stderr=not config.log.file))
    handler.addFilter(CONTEXT)
    root.addHandler(handler)
    root.addHandler(LINES)  # counts for the metrics; removed above with the others, so never twice
    root.setLevel(config.log.level)


class Daemon:
    """Process lifecycle around one or more Servers."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.plugins = discover()
        self.described = Descriptions.of((cls.COUNTERS, cls.GAUGES) for cls in self.plugins.values())
        self.stopping: asyncio.Event | None = None
        self.children: list[int] = []
        self.started = time.time()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # what the process was started with (bound sockets, user); in a single process, its plugin
        # sections as they were last built (_rebased): what restart_only_changes compares a reload with
        self.started_with: Config | None = None
        self.zeros: list[tuple[str, ...]] = []  # counters served at zero until counted
        # ("reloads", outcome): count, in the main process; every outcome present from the start
        self.reloads = {("reloads", outcome): 0 for outcome in ("applied", "failed", "unconfirmed")}
        self.last_reload = (True, self.started)  # (applied, when the last applied one was)
        self.phc: hwstamp.PhcClock | None = None  # the NIC clock of ntp.hwtimestamp, when one was switched on

    def load(self) -> Config:
        return load_config(self.config_path, sections(self.plugins))

    def run(self) -> int:
        config = self.started_with = self.load()
        used = [cls for cls in self.plugins.values() if cls.section in config.plugins]
        self.zeros = zero_series((getattr(cls, "SERIES", {}) for cls in used),
                                 [cls.name for cls in self.plugins.values() if cls not in used])  # fmt: skip
        setup_logging(config)
        raise_fd_limit()
        workers = config.ntp.workers
        self.phc = hwstamp.enable(config.ntp.hwtimestamp)  # (before the privileges go: it needs them)
        socket_sets = bind_all(config, workers, self.phc is not None)
        metrics_sock = None
        if config.metrics_listen is not None:
            metrics_sock = _bind_tcp(config.metrics_listen)
        trust_service_user(config)
        try:
            auths, _ = build_plugins(config, self.plugins)
        except PluginError as exc:
            raise StartupError(str(exc)) from None
        bound = metrics_sock.getsockname()[:2] if metrics_sock else None
        record = runtime.write(self.config_path, runtime.Record(os.getpid(), config.source, bound, __version__))
        if record is None:
            log.warning("cannot write the runtime record in %s: ntsd reload and status -c cannot find this server "
                        "(signal process %d)", runtime.runtime_dir(), os.getpid())  # fmt: skip
        try:
            return self._run(config, socket_sets, metrics_sock, auths)
        finally:
            if record is not None:
                runtime.remove(record)

    def _run(
        self,
        config: Config,
        socket_sets: list[dict[tuple[str, int], socket.socket]],
        metrics_sock: socket.socket | None,
        auths: list[Plugin],
    ) -> int:
        workers = config.ntp.workers
        drop_privileges(config.ntp.user, config.ntp.group)
        precision = measure_precision()
        log.info("ntsd %s starting (%s)", __version__, config.source)
        for warning in config.warnings:
            log.warning("%s: %s", config.source, warning)
        # Held from here until each process has its handlers (_signals): a reload or stop sent while
        # a worker starts would otherwise kill it (the default action) instead of being carried out.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        if workers == 1:
            return asyncio.run(self._serve_one(config, socket_sets[0], metrics_sock, precision, auths))
        shared = SharedCounters(workers)
        supervisor = os.getpid()
        for index, sockets in enumerate(socket_sets):
            pid = os.fork()
            if pid == 0:
                code = 1
                LINES.reset()  # the parent's lines so far are the parent's to report
                CONTEXT.worker(index, workers)
                try:
                    if metrics_sock is not None:
                        metrics_sock.close()
                    for other in socket_sets:
                        if other is not sockets:
                            for s in other.values():
                                s.close()
                    code = asyncio.run(self._serve_worker(config, sockets, precision, shared, index, auths, supervisor))
                except BaseException:  # os._exit below skips the interpreter's report: say what happened
                    log.exception("worker %d failed", os.getpid())
                finally:
                    os._exit(code)
            self.children.append(pid)
        for sockets in socket_sets:
            for s in sockets.values():
                s.close()
        for auth in auths:
            auth.close()  # the workers hold their own copies
        return asyncio.run(self._supervise(config, metrics_sock, shared))

    def _signals(self, loop: asyncio.AbstractEventLoop, on_hup: Any) -> asyncio.Event:
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)  # any that came meanwhile is handled now
        return stopping

    async def _serve_one(
        self,
        config: Config,
        sockets: dict[tuple[str, int], socket.socket],
        metrics_sock: socket.socket | None,
        precision: int,
        auths: list[Plugin],
    ) -> int:
        loop = asyncio.get_running_loop()
        server = Server(config, self.plugins, precision, auths, self.phc)
        server.adopt(sockets, loop)
        for addr in sockets:
            log.info("serving NTP on %s", format_addr(addr))
        await server.start_plugins()
        stopping = self._signals(loop, lambda: self._reload(server, loop))
        metrics = None
        if metrics_sock is not None:
            source = lambda: self._own((server.counters(), server.gauges()))  # noqa: E731
            metrics = MetricsServer(source, server.reports, self.described, config.metrics_reports, self._extra)
            await metrics.start_on(metrics_sock)
            log.info("metrics on http://%s/metrics", format_addr(metrics_sock.getsockname()))
        log.info("ready")
        notify("READY=1")
        await self._tick_until(stopping, server.refresh_state)
        notify("STOPPING=1")
        log.info("shutting down")
        if metrics is not None:
            await metrics.stop()
        server.close()
        await server.stop_plugins()
        log.info("stopped")
        return 0

    def _reload(
        self, server: Server, loop: asyncio.AbstractEventLoop, done: Callable[[bool], None] | None = None
    ) -> None:
        """SIGHUP: validate the file, then apply it (one reload at a time). A worker passes `done`,
        told whether it applied all of the file; the single process (no `done`) binds new ports,
        keeps the reload figures and tells systemd. A reload that logged an error while it was
        applied (a key file or certificate that cannot be used, a port that cannot be bound) did
        not apply all of it: what runs is not what the files say."""
        main = done is None
        report = self._reloaded if done is None else done
        read = self._read_new(report, main)
        if read is None:
            return
        new, logging_ok, restart_only = read

        async def apply() -> None:
            async with self._reload_lock:  # an error of the reload before this one is not this one's
                if main:
                    notify(_reloading())
                applied, errors = False, LINES.errors()
                try:
                    reloaded = await server.reload(new, loop, may_bind=main)
                    if reloaded and main and self.started_with is not None:
                        self.started_with = _rebased(self.started_with, new)
                    applied = reloaded and LINES.errors() == errors and logging_ok and not restart_only
                finally:
                    report(applied)
                    if main:
                        notify("READY=1")

        self._spawn(loop, apply())

    async def _serve_worker(
        self,
        config: Config,
        sockets: dict[tuple[str, int], socket.socket],
        precision: int,
        shared: SharedCounters,
        index: int,
        auths: list[Plugin],
        supervisor: int,
    ) -> int:
        loop = asyncio.get_running_loop()
        server = Server(config, self.plugins, precision, auths, self.phc)
        server.adopt(sockets, loop)
        await server.start_plugins()

        seen = 0  # the reloads ordered before the fork: none (one ordered since is still to be done here)

        def on_hup() -> None:
            nonlocal seen
            number = shared.ordered_reload()  # the parent numbered it before signalling
            if number == seen:  # not ordered: someone signalled this worker (pidof picked it); all reload
                log.warning("SIGHUP sent to worker %d: reloading the whole server (signal process %d, or run "
                            "ntsd reload)", os.getpid(), supervisor)  # fmt: skip
                os.kill(supervisor, signal.SIGHUP)
                return
            seen = number
            self._reload(server, loop, done=lambda applied: shared.reload_done(index, number, applied))

        stopping = self._signals(loop, on_hup)

        ticks, reports = 0, server.reports()

        def tick() -> None:
            nonlocal ticks
            if os.getppid() != supervisor:  # killed outright (kill -9, the OOM killer): orphans would keep
                if not stopping.is_set():  # the ports from a restarted ntsd
                    log.warning("the supervising process %d is gone; stopping", supervisor)
                    stopping.set()
                return
            nonlocal reports
            ticks += 1
            if ticks % _PUBLISHES_PER_STATE == 0:
                server.refresh_state()
                reports = server.reports()  # (large: taken, and encoded, once a second)
            shared.publish(index, {**server.counters(), **LINES.counts}, server.gauges(), reports)

        await self._tick_until(stopping, tick, STATE_INTERVAL / _PUBLISHES_PER_STATE)
        tick()
        server.close()
        await server.stop_plugins()
        return 0

    async def _supervise(self, config: Config, metrics_sock: socket.socket | None, shared: SharedCounters) -> int:
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            read = self._read_new(self._reloaded, main=True)
            if read is None:
                return
            new, _, restart_only = read  # (a worker that cannot reopen the log reports its failure itself)
            notify(_reloading())
            number = shared.order_reload()
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
            self._spawn(loop, finished(number, new.source, restart_only))

        async def finished(number: int, source: str, restart_only: bool) -> None:
            """Say the reload is over (log, systemd) only once every worker has applied it."""
            deadline = time.monotonic() + RELOAD_WAIT_S
            while (behind := shared.behind(number)) and time.monotonic() < deadline and not stopping.is_set():
                await asyncio.sleep(0.01)
            failed = shared.failed()
            if behind and not stopping.is_set():
                log.warning("reload: worker(s) %s not done after %.0f s", self._pids(behind), RELOAD_WAIT_S)
                self._reloaded(None)
            elif failed:
                log.error("reload not applied in full by worker(s) %s (their errors say why)", self._pids(failed))
                self._reloaded(False)
            elif restart_only:
                log.info("configuration reloaded from %s, but for what needs a restart", source)
                self._reloaded(False)
            else:
                log.info("configuration reloaded from %s", source)
                self._reloaded(True)
            if shared.ordered_reload() == number:  # systemd hears of the last one only
                notify("READY=1")

        stopping = self._signals(loop, on_hup)
        metrics = None
        if metrics_sock is not None:
            metrics = MetricsServer(
                lambda: self._own(shared.total()), shared.reports, self.described, config.metrics_reports, self._extra
            )
            await metrics.start_on(metrics_sock)
        for addr in config.ntp.listen:
            log.info("serving NTP on %s", format_addr(addr))
        if metrics_sock is not None:
            log.info("metrics on http://%s/metrics", format_addr(metrics_sock.getsockname()))
        log.info("ready with %d workers (pids %s; the first speaks for all)", len(self.children),
                 ", ".join(map(str, self.children)))  # fmt: skip
        notify("READY=1")
        code = 0
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stopping.wait()
            for pid in list(self.children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    log.error("worker %d exited unexpectedly (%s); shutting down", pid, _exit_description(status))
                    self.children.remove(pid)
                    stopping.set()
                    code = 1
        notify("STOPPING=1")
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not await _reap(self.children, WORKER_STOP_S):
            code = 1
        if metrics is not None:
            await metrics.stop()
        log.info("stopped")
        return code

    def _spawn(self, loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task held until it ends (the loop keeps only weak references to tasks)."""
        task = loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_new(self, report: Callable[[bool], None], main: bool) -> tuple[Config, bool, bool] | None:
        """A reload's first step in every process: the file, validated (None when it is refused,
        which is logged and reported), logging reopened as it says (False: that failed), and, in
        the main process, whether it changes what only a restart applies (named in the log; such a
        reload is applied in part, and counted so)."""
        try:
            new = self.load()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            report(False)
            return None
        errors = LINES.errors()
        _reopen_logging(new)
        logging_ok = LINES.errors() == errors
        names = restart_only_changes(self.started_with, new, self.plugins) if main and self.started_with else []
        if names:
            log.warning("%s changed: a restart applies that, a reload cannot (the rest is applied)", ", ".join(names))
        return new, logging_ok, bool(names)

    def _reloaded(self, applied: bool | None) -> None:
        """Count a reload's outcome (False: refused or applied in part; None: not confirmed by every
        worker in time)."""
        outcome = ("reloads", "unconfirmed" if applied is None else "applied" if applied else "failed")
        self.reloads[outcome] = self.reloads.get(outcome, 0) + 1
        self.last_reload = (bool(applied), time.time() if applied else self.last_reload[1])

    def _pids(self, indices: list[int]) -> str:
        return ", ".join(str(self.children[i]) for i in indices if i < len(self.children))

    def _own(
        self, totals: tuple[Mapping[tuple[str, ...], int], Mapping[str, float]]
    ) -> tuple[dict[tuple[str, ...], int], dict[str, float]]:
        """The metrics: the serving process's (or the workers' summed) with this process's own."""
        counts = dict.fromkeys(self.zeros, 0)
        counts.update(totals[0])
        for key, value in (*LINES.counts.items(), *self.reloads.items()):
            counts[key] = counts.get(key, 0) + value
        applied, when = self.last_reload
        return counts, {
            **totals[1],
            "uptime_seconds": round(time.time() - self.started, 3),
            "config_last_reload_successful": int(applied),
            "config_last_reload_success_timestamp_seconds": round(when, 3),
        }

    def _extra(self) -> str:
        """Process metrics (this process and its workers, summed) and the build info."""
        return render_process(process_metrics([os.getpid(), *self.children])) + build_info(__version__)

    @staticmethod
    async def _tick_until(stopping: asyncio.Event, tick: Any, interval: float = STATE_INTERVAL) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stopping.wait()
            if not stopping.is_set():
                tick()


def restart_only_changes(running: Config, new: Config, plugins: Mapping[str, type[Plugin]] | None = None) -> list[str]:
    """The settings in `new` that a reload cannot apply to a server started with `running`: they
    shape the processes and sockets made at start (ntp.listen, and the sections of plugins that
    listen, too when workers share the ports), or that plugins name themselves (`restart_only`)."""
    changed = []
    if new.ntp.workers != running.ntp.workers:
        changed.append("ntp.workers")
    if new.ntp.batch != running.ntp.batch:
        changed.append("ntp.batch")
    if new.ntp.hwtimestamp != running.ntp.hwtimestamp:
        changed.append("ntp.hwtimestamp")
    shared = running.ntp.workers > 1  # the workers share the sockets bound before they started
    if shared and new.ntp.listen != running.ntp.listen:
        changed.append("ntp.listen")
    for cls in (plugins or {}).values():
        before, after = running.plugins.get(cls.section), new.plugins.get(cls.section)
        if shared and cls.listens and (before is None) != (after is None):
            changed.append(f"{cls.section} ({'enabled' if before is None else 'disabled'})")
        if before is None or after is None:
            continue
        if shared and cls.listens and cls.listen_addresses(before) != cls.listen_addresses(after):
            changed.append(f"{cls.section}.listen")
        changed += cls.restart_only(before, after)
    if (new.ntp.user, new.ntp.group) != (running.ntp.user, running.ntp.group):
        changed.append("ntp.user/group")
    if new.metrics_reports != running.metrics_reports:
        changed.append("metrics.reports")
    if new.metrics_listen != running.metrics_listen:
        changed.append("metrics.listen")
    return changed


def _rebased(running: Config, new: Config) -> Config:
    """What a single process runs after it applied `new`, as restart_only_changes compares: a plugin
    section it disabled is gone, and one it enabled was built anew from `new` (all of it applied)."""
    return replace(running, plugins={name: running.plugins.get(name, section) for name, section in new.plugins.items()})


def notify(state: str) -> None:
    """Tell systemd what the server is doing (`Type=notify` units: READY=1, RELOADING=1, STOPPING=1);
    nothing when not started by it. Only the main process speaks: systemd listens to it alone."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # "@": the abstract namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), address)


def _reloading() -> str:
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def _exit_description(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exit status {code}"


async def _reap(pids: list[int], within: float) -> bool:
    """Wait for the workers told to stop; those still there after `within` seconds (hung) are killed,
    so that a stop never hangs on one of them. True when all stopped by themselves."""
    deadline = time.monotonic() + within
    left = list(pids)
    while left:
        left = [pid for pid in left if os.waitpid(pid, os.WNOHANG) == (0, 0)]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    for pid in left:
        log.error("worker %d did not stop within %.0f s; killed", pid, within)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return not left


def _reopen_logging(config: Config) -> None:
    """On reload, in every process (the parent and each worker write the log themselves): the file
    is opened anew, so a log rotated away (renamed, as logrotate does) is followed by a new one,
    and a changed file or level applies."""
    try:
        setup_logging(config)
    except StartupError as exc:
        log.error("reload: %s; logging goes on where it went", exc)


def _bind_tcp(addr: tuple[str, int]) -> socket.socket:
    try:
        return open_tcp_listener(*addr, backlog=64)
    except OSError as exc:
        raise StartupError(f"cannot listen for metrics on {format_addr(addr)}: {exc.strerror}") from None
