"""The agent's part in streams (zpar.streaming), as a part of AgentCore.

A worker's ITEMS go on to the broker ahead of its results; FEED from the
broker goes to the worker holding the task, or waits in the queued task's
inbox and follows its TASKS. A task that exchanged an item is marked
``streamed``, so the core never runs it again.
"""

from __future__ import annotations

import collections
from zpar import protocol as P

from .slots import QueuedTask, ToWorker, WorkerSlot, WorkerState


class StreamPassing:
    """AgentCore's stream methods; the state they use is AgentCore's."""

    workers: dict[bytes, WorkerSlot]
    queue: collections.deque[QueuedTask]
    items: list[P.ItemEntry]
    item_credits: list[P.Credit]
    _streaming: dict[int, WorkerSlot]
    _kept: int

    def worker_items(self, identity: bytes, msg: P.Items) -> None:
        """Items (and read credits) from a worker's streaming task: on to the broker."""
        slot = self.workers.get(identity)
        if slot is None or slot.state is not WorkerState.BUSY or slot.stale:
            return
        for entry in msg.items:
            task = self._held_by(slot, entry.id)
            if task is not None and entry.id not in slot.doomed:
                task.streamed = True
                self._streaming[entry.id] = slot
                self.items.append(entry)
        for credit in msg.credits:
            if self._held_by(slot, credit.id) is not None:
                self.item_credits.append(credit)

    @staticmethod
    def _held_by(slot: WorkerSlot, tid: int) -> QueuedTask | None:
        for task in slot.batch:
            if task.id == tid:
                return task
        return None

    def _find(self, tid: int) -> tuple[WorkerSlot | None, QueuedTask | None]:
        """The worker running task ``tid`` and the task, or (None, the task in our queue), or (None, None)."""
        slot = self._streaming.get(tid)
        if slot is not None and slot.state is WorkerState.BUSY:
            task = self._held_by(slot, tid)
            if task is not None:
                return slot, task
        for slot in self.workers.values():
            if slot.state is WorkerState.BUSY and not slot.stale:
                task = self._held_by(slot, tid)
                if task is not None:
                    return slot, task
        for task in self.queue:
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
                    self._kept += not task.closed
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
                self._kept += task.inbox is None and not task.closed
                task.closed = True
                continue
            task.streamed = True
            out.setdefault(slot.identity, ([], [], []))[2].append(tid)
        return [ToWorker(identity, P.Feed(tuple(i), tuple(c), tuple(x))) for identity, (i, c, x) in out.items()]

    def _feed_kept(self, slot: WorkerSlot, batch: list[QueuedTask]) -> ToWorker | None:
        """What producers sent the batch's tasks before a worker had them, to follow the TASKS."""
        items: list[P.ItemEntry] = []
        closed: list[int] = []
        for task in batch:
            if task.inbox is not None or task.closed:
                self._kept = max(0, self._kept - 1)
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
        entries = list(next(P.batches(self.items))) if self.items else []
        self.items = self.items[len(entries):]
        credits, self.item_credits = self.item_credits[:P.BATCH_MAX_TASKS], self.item_credits[P.BATCH_MAX_TASKS:]
        return entries, credits

    def put_back_items(self, entries: list[P.ItemEntry], credits: list[P.Credit]) -> None:
        """A run ``take_items`` gave that could not go now: first in line again."""
        self.items[:0] = entries
        self.item_credits[:0] = credits
