"""Prefetched tasks go back to the broker when every worker of the node is held by a long task.

An agent asks the broker for more tasks than it has workers (``Slots.credit_target``)
so that tiny tasks do not each wait a round trip. But an estimate can be
wrong: the tasks prefetched behind a task that runs long wait while a worker
of another node may idle, and if the long task waits for them (a nested map,
a pprocess exchange inside a call on a cluster of one-worker nodes) they wait
for ever. So once no worker of this node has taken a task for
``RETURN_AFTER`` while tasks wait, and no worker is on its way (starting),
the agent gives the waiting ones back (GIVE_BACK) with its unused credits,
and asks the broker again only when one of its workers is free: the broker
hands them to whoever is free first.

Tasks that exchanged stream objects, or may be sent some (channel tasks, or
a FEED already kept for them), stay: their objects are on their way here.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from zpar import protocol as P

from .records import QueuedTask, WorkerSlot, WorkerState

#: Seconds tasks may wait with every worker busy and none taking a task before they go back to the broker.
RETURN_AFTER = 0.1


class Prefetch:
    """The clock of one stall: since when tasks have waited with no worker taking any."""

    __slots__ = ("holding", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        self.holding = False  # we gave tasks back: ask for none until a worker is free

    def assigned(self, now: float, gave: bool, waiting: bool) -> None:
        """After ``Slots.assign``: whether a worker took a batch (``gave``), and whether tasks still wait."""
        if not waiting:
            self.since = None
        elif gave or self.since is None:  # the clock runs from the last task a worker took
            self.since = now

    def worker_free(self) -> None:
        self.holding = False

    def deadline(self) -> float:
        return float("inf") if self.since is None else self.since + RETURN_AFTER

    def give_back(self, now: float, queue: collections.deque[QueuedTask],
                  workers: Iterable[WorkerSlot]) -> list[int]:
        """The ids of the waiting tasks that go back to the broker now (taken out of ``queue``), if any."""
        if self.since is None or now < self.since + RETURN_AFTER:
            return []
        self.since = None
        if any(s.state is WorkerState.IDLE or s.state is WorkerState.STARTING for s in workers):
            return []  # a worker is free, or on its way: they wait for it
        back = [t.id for t in queue if movable(t)]
        if back:
            kept = [t for t in queue if not movable(t)]
            queue.clear()  # in place: the streams part holds this queue
            queue.extend(kept)
            self.holding = True
        return back


def movable(task: QueuedTask) -> bool:
    """A task another node may run instead: no stream object sent to it here, none on its way."""
    return not (task.streamed or task.inbox is not None or task.entry.flags & P.FLAG_CHANNEL)
