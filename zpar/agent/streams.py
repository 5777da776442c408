"""The agent's part in streams (zpar.streaming), a part the slot accounting (``Slots``) holds.

A worker's ITEMS go on to the broker ahead of its results; FEED from the
broker goes to the worker holding the task, or waits in the queued task's
inbox and follows its TASKS. A task that exchanged an item is marked
``streamed``, so the agent never runs it again.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from zpar import protocol as P

from .actions import ToWorker
from .records import QueuedTask, WorkerSlot, WorkerState


class StreamPassing:
    """Items and feed of running and queued tasks; it reads the registry and queue of its ``Slots``."""

    def __init__(self, workers: dict[bytes, WorkerSlot], queue: collections.deque[QueuedTask]) -> None:
        self._workers = workers
        self._queue = queue
        self.items: list[P.ItemEntry] = []  # to send, ahead of the results
        self.item_credits: list[P.Credit] = []
        self._streaming: dict[int, WorkerSlot] = {}  # task id -> the worker streaming it
        self.kept = 0  # queued tasks holding FEED (cancelled ones stay counted: a look too many)

    def worker_items(self, identity: bytes, msg: P.Items) -> None:
        """Items (and read credits) from a worker's streaming task: on to the broker."""
        slot = self._workers.get(identity)
        if slot is None or slot.state is not WorkerState.BUSY or slot.stale:
            return
        for tid, run in P.runs(msg.items):
            task = _held_by(slot, tid)
            if task is not None and tid not in slot.doomed:
                task.streamed = True
                self._streaming[tid] = slot
                self.items.extend(run)
        for credit in msg.credits:
            if _held_by(slot, credit.id) is not None:
                self.item_credits.append(credit)

    def ended(self, ids: Iterable[int]) -> None:
        """These tasks ended (a result, or their worker died): no more items to route for them."""
        if self._streaming:
            for tid in ids:
                self._streaming.pop(tid, None)

    def forget(self) -> None:
        """The broker that sent the tasks is gone: nothing of theirs goes on."""
        self.items.clear()
        self.item_credits.clear()
        self._streaming.clear()
        self.kept = 0

    def _find(self, tid: int) -> tuple[WorkerSlot | None, QueuedTask | None]:
        """The worker running task ``tid`` and the task, or (None, the task in our queue), or (None, None)."""
        slot = self._streaming.get(tid)
        if slot is not None and slot.state is WorkerState.BUSY:
            task = _held_by(slot, tid)
            if task is not None:
                return slot, task
        for slot in self._workers.values():
            if slot.state is WorkerState.BUSY and not slot.stale:
                task = _held_by(slot, tid)
                if task is not None:
                    return slot, task
        for task in self._queue:
            if task.id == tid:
                return None, task
        return None, None

    def feed(self, msg: P.Feed) -> list[ToWorker]:
        """Objects, credits and closes from a producer: to the workers holding the tasks, or kept with them."""
        out: dict[bytes, tuple[list[P.ItemEntry], list[P.Credit], list[int]]] = {}
        for entry in msg.items:
            slot, task = self._find(entry.id)
            if task is None:
                continue  # ended, or cancelled
            if slot is None:
                if task.inbox is None:
                    self.kept += not task.closed
                    task.inbox = []
                task.inbox.append(entry)
                continue
            task.streamed = True
            out.setdefault(slot.identity, ([], [], []))[0].append(entry)
        for credit in msg.credits:
            slot, _task = self._find(credit.id)
            if slot is not None:
                out.setdefault(slot.identity, ([], [], []))[1].append(credit)
        for tid in msg.closed:
            slot, task = self._find(tid)
            if task is None:
                continue
            if slot is None:
                self.kept += task.inbox is None and not task.closed
                task.closed = True
                continue
            task.streamed = True
            out.setdefault(slot.identity, ([], [], []))[2].append(tid)
        return [ToWorker(identity, P.Feed(tuple(i), tuple(c), tuple(x))) for identity, (i, c, x) in out.items()]

    def feed_kept(self, slot: WorkerSlot, batch: list[QueuedTask]) -> ToWorker | None:
        """What producers sent the batch's tasks before a worker had them, to follow the TASKS."""
        items: list[P.ItemEntry] = []
        closed: list[int] = []
        for task in batch:
            if task.inbox is not None or task.closed:
                self.kept = max(0, self.kept - 1)
            if task.inbox:
                task.streamed = True
                items.extend(task.inbox)
                task.inbox = None
            if task.closed:
                task.streamed = True
                closed.append(task.id)
                task.closed = False
        if not items and not closed:
            return None
        return ToWorker(slot.identity, P.Feed(tuple(items), (), tuple(closed)))

    def take_items(self) -> tuple[list[P.ItemEntry], list[P.Credit]] | None:
        """Pop the next run of streams' items (and credits) to send, or None."""
        if not self.items and not self.item_credits:
            return None
        run = next(P.batches(self.items)) if self.items else []
        if len(run) == len(self.items):  # the common case: all of them fit
            entries, self.items = self.items, []
        else:
            entries = list(run)
            del self.items[:len(entries)]
        credits, self.item_credits = self.item_credits[:P.BATCH_MAX_TASKS], self.item_credits[P.BATCH_MAX_TASKS:]
        return entries, credits

    def put_back_items(self, entries: list[P.ItemEntry], credits: list[P.Credit]) -> None:
        """A run ``take_items`` gave that could not go now: first in line again."""
        self.items[:0] = entries
        self.item_credits[:0] = credits


def _held_by(slot: WorkerSlot, tid: int) -> QueuedTask | None:
    for task in slot.batch:
        if task.id == tid:
            return task
    return None
