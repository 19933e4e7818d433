"""A lane: an event loop on a thread of its own, at a lower CPU priority, for slow conversations.

Strategy: a plugin whose replies wait on another service (MS-SNTP waits on Samba) runs that
conversation here instead of on the server's event loop, so its work never sits in front of
NTS-KE sessions or metrics, and the UDP listeners, which hand it requests (`Defer.lane`), keep
the CPU when both want it: on Linux the lane's thread is niced (`NICE`, per thread), so under
saturation the kernel gives the serving threads the core and the lane what is left. Python
threads share one interpreter lock, which a thread holds until it blocks or a switch interval
passes; the lane's work is short steps between waits on sockets, so it gives the lock back soon.
Starting and stopping are awaited from the server's loop; everything else reaches the lane with
`call_soon_threadsafe` or `run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("ntsd.lane")
NICE = 10  # how much lower than the serving threads (CFS weights: about 1 to 9 under contention)
T = TypeVar("T")


class Lane:
    """An event loop on its own thread (`loop`), niced where the platform allows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None  # (made by start: an unstarted lane holds nothing)
        self._thread: threading.Thread | None = None
        self.niced = False

    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        assert self.loop is not None
        asyncio.set_event_loop(self.loop)
        if hasattr(os, "setpriority"):
            try:  # on Linux, per thread (a thread is a task with its own nice value)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
                self.niced = True
            except OSError as exc:  # (a seccomp filter without setpriority, say)
                log.debug("%s: cannot lower the thread's priority: %s", self.name, exc)
        ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the lane, awaited from another loop."""
        assert self.loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.loop))

    async def stop(self) -> None:
        """Cancel what still runs on the lane, stop its loop and join its thread."""
        if self._thread is None or self.loop is None:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        await self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread, self._thread = self._thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 5)
