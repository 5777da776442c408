"""What the broker measures for its dashboard and /metrics, as plain data (web.py renders it)."""

from __future__ import annotations

import bisect
import collections
from typing import Any

from zpar import protocol as P

#: Upper bounds of the task duration histogram, in seconds (Prometheus' "le"); the last bucket is +Inf.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)
_BOUNDS_US = tuple(int(b * 1e6) for b in DURATION_BUCKETS)

#: How a task ended, as the outcome label of zpar_tasks_finished_total, by the status of its RESULT.
OUTCOMES = {P.Status.OK: "ok", P.Status.STREAMED: "ok", P.Status.RAISED: "raised", P.Status.LOST: "lost",
            P.Status.TIMEOUT: "timeout", P.Status.MEMORY: "memory", P.Status.CANCELLED: "cancelled",
            P.Status.DEP_FAILED: "dependency_failed"}


class Durations:
    """A histogram of the run times workers report (``ResultEntry.duration_us``), counted per bucket."""

    __slots__ = ("counts", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS_US) + 1)  # the last: longer than every bound
        self.sum_us = 0

    def observe(self, us: int) -> None:
        self.counts[bisect.bisect_left(_BOUNDS_US, us)] += 1
        self.sum_us += us

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": [[le, cumulative count], ...], "count": n, "sum": seconds}`` (le None: +Inf)."""
        cumulative, running = [], 0
        for bound, count in zip((*DURATION_BUCKETS, None), self.counts, strict=True):
            running += count
            cumulative.append([bound, running])
        return {"buckets": cumulative, "count": running, "sum": self.sum_us / 1e6}


#: Tasks the broker remembers once they ended (``History``), newest first out.
HISTORY_SIZE = 10_000
_FIELDS = ("time", "producer", "task", "function", "node", "worker", "outcome", "duration_s", "attempts", "error",
           "submitted", "dispatched")


class History:
    """A bounded ring of the tasks that ended, as tuples (cheap to keep: one per task), read as dicts.

    ``time`` is the wall clock when the broker learnt the outcome,
    ``submitted`` when it accepted the task and ``dispatched`` when it last
    gave it to an agent (0: never); ``task`` the producer's id for it;
    ``worker`` the pid that ran it (0: unknown); ``error`` a failed task's
    traceback text, or why a run was lost.
    """

    __slots__ = ("ring",)

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self.ring: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=size)

    def add(self, when: float, producer: str, task: int, function: str, node: str, worker: int, outcome: str,
            duration_us: int, attempts: int, error: str, submitted: float = 0.0, dispatched: float = 0.0) -> None:
        self.ring.append((when, producer, task, function, node, worker, outcome, duration_us / 1e6, attempts, error,
                          submitted, dispatched))

    def recent(self, limit: int = 100, failed: bool = False) -> list[dict[str, Any]]:
        """The ``limit`` latest, newest first; with ``failed``, only those that did not end "ok"."""
        out: list[dict[str, Any]] = []
        for row in reversed(self.ring):
            if failed and row[6] == "ok":
                continue
            out.append(dict(zip(_FIELDS, row, strict=True)))
            if len(out) >= limit:
                break
        return out
