"""A producer's queue of tasks in priority order: higher first, then arrival; cancels leave tombstones.

A deque per priority level, the levels in a heap. The common case, every
task at priority 0, is one deque: ``put`` appends to the top level and
``take`` pops from it, as a plain deque would, and the heap is touched only
when a level is made or empties. A task put back (given back, lost and run
again) goes to the front of its level.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import TaskRecord


class TaskQueue:
    """Tasks by priority, then arrival. ``live``: tasks queued; ``gone``: tombstones among them (tasks whose
    ``state`` the caller set to ``tombstone``: ``take`` skips them)."""

    __slots__ = ("_heap", "_levels", "_tombstone", "front", "gone", "live", "top")

    def __init__(self, tombstone: Any) -> None:
        self._tombstone = tombstone  # TaskState.GONE (records.py, which imports this module)
        self.front: collections.deque[TaskRecord] = collections.deque()  # the highest level's: take pops here
        self.top = 0  # ... its priority
        self._levels = {0: self.front}  # priority -> its tasks (the top level kept even when empty)
        self._heap = [0]  # the levels' priorities, negated: the next top is -heap[0] once the top empties
        self.live = self.gone = 0

    def put(self, task: TaskRecord, priority: int, front: bool = False) -> None:
        """Queue ``task`` at the end of its level (``front``: at its start: it was queued before)."""
        if priority == self.top:
            level = self.front
        else:
            level = self._level(priority)
        if front:
            level.appendleft(task)
        else:
            level.append(task)
        self.live += 1

    def _level(self, priority: int) -> collections.deque[TaskRecord]:
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = collections.deque()
            heapq.heappush(self._heap, -priority)
            if priority > self.top:
                self.front, self.top = level, priority
        return level

    def take(self) -> TaskRecord | None:
        """The next live task (highest priority, oldest first), tombstones before it dropped; or None."""
        gone = self._tombstone
        level = self.front
        while True:
            while level:
                task = level.popleft()
                if task.state is gone:
                    self.gone -= 1
                    continue
                self.live -= 1
                return task
            if len(self._levels) == 1:
                return None
            level = self._next_level()

    def _next_level(self) -> collections.deque[TaskRecord]:
        """The top level is empty: drop it, and the next highest is the top."""
        del self._levels[self.top]
        heapq.heappop(self._heap)
        self.top = -self._heap[0]
        self.front = self._levels[self.top]
        return self.front

    def tombstone(self) -> None:
        """One of its tasks left it where it lies (the caller marked it GONE), in O(1); the levels are
        compacted when tombstones outnumber live tasks, so it never holds more than twice what is queued."""
        self.live -= 1
        self.gone += 1
        if not self.live:
            self.clear()
        elif self.gone > 1024 and self.gone > self.live:
            self._compact()

    def _compact(self) -> None:
        gone = self._tombstone
        levels = {p: collections.deque(t for t in level if t.state is not gone)
                  for p, level in self._levels.items()}
        self._levels = {p: level for p, level in levels.items() if level} or {0: collections.deque()}
        self._heap = [-p for p in self._levels]
        heapq.heapify(self._heap)
        self.top = -self._heap[0]
        self.front = self._levels[self.top]
        self.gone = 0

    def clear(self) -> None:
        self.front = collections.deque()
        self.top = 0
        self._levels = {0: self.front}
        self._heap = [0]
        self.live = self.gone = 0

    def __iter__(self) -> Iterator[TaskRecord]:
        """Every task in the order ``take`` would give them, tombstones included."""
        for priority in sorted(self._levels, reverse=True):
            yield from self._levels[priority]

    def __len__(self) -> int:
        """Tasks and tombstones held."""
        return sum(len(level) for level in self._levels.values())

    def levels(self) -> int:
        return len(self._levels)
