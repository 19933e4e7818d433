"""Worker snapshots and reload numbering in shared memory, as the parent and workers see them."""

from __future__ import annotations

import os

from nts.server.shared import SharedCounters


def test_a_reload_is_done_when_every_worker_has_reached_its_number() -> None:
    shared = SharedCounters(3)
    first = shared.order_reload()
    assert shared.behind(first) == [0, 1, 2]
    for index in (0, 2):
        shared.reload_done(index, shared.ordered_reload())
    assert shared.behind(first) == [1]
    second = shared.order_reload()  # sent before worker 1 handled the first: the signals coalesce
    assert second == first + 1
    shared.reload_done(1, shared.ordered_reload())  # one reload, read after both were ordered
    assert shared.behind(first) == []
    assert shared.behind(second) == [0, 2]
    shared.reload_done(0, first)  # a late report of an older reload never moves a worker back
    assert shared.behind(second) == [0, 2]
    shared.reload_done(1, second, applied=False)  # the same number again (two signals, one order):
    assert shared.failed() == [1]  # the later outcome stands
    shared.reload_done(1, second)
    assert shared.failed() == []


def test_workers_write_what_the_parent_reads_across_fork() -> None:
    shared = SharedCounters(2)
    number = shared.order_reload()
    pid = os.fork()
    if pid == 0:
        shared.reload_done(1, shared.ordered_reload())
        shared.publish(1, {("requests",): 5}, {"mac_ledger_entries": 3.0})
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert shared.behind(number) == [0]
    counts, gauges = shared.total()
    assert counts == {("requests",): 5}
    assert gauges["mac_ledger_entries"] == 3.0 and gauges["workers"] == 2
