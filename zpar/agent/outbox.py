"""Results an agent sent and the broker has not acknowledged yet.

ZeroMQ drops what is in flight on a connection that breaks, so the agent keeps
each result until the broker's ACK, sends the overdue ones again, and sends
all of them again after registering anew with the same broker. The broker
delivers a task's result at most once, so repeats are harmless.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

from zpar import protocol as P


class Unacked:
    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit  # past it the oldest are dropped: their producers resubmit after a restart
        self._items: collections.OrderedDict[int, tuple[P.ResultEntry, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def sent(self, entries: list[P.ResultEntry], now: float) -> None:
        for entry in entries:
            self._items[entry.id] = (entry, now)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def acked(self, ids: tuple[int, ...]) -> None:
        for tid in ids:
            self._items.pop(tid, None)

    def clear(self) -> None:
        self._items.clear()

    def take(self, now: float, older_than: float = 0.0) -> Iterator[Sequence[P.ResultEntry]]:
        """Runs of results sent at least ``older_than`` seconds ago, to send again (marked sent now)."""
        due = [entry for entry, at in self._items.values() if now - at >= older_than]
        for entry in due:
            self._items[entry.id] = (entry, now)
        yield from P.batches(due) if due else ()
