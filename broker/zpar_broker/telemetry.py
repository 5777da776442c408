"""What the broker measures for its dashboard and /metrics, as plain data (web.py renders it)."""

from __future__ import annotations

import bisect
from typing import Any

from zpar import protocol as P

#: Upper bounds of the task duration histogram, in seconds (Prometheus' "le"); the last bucket is +Inf.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)
_BOUNDS_US = tuple(int(b * 1e6) for b in DURATION_BUCKETS)

#: How a task ended, as the outcome label of zpar_tasks_finished_total, by the status of its RESULT.
OUTCOMES = {P.Status.OK: "ok", P.Status.STREAMED: "ok", P.Status.RAISED: "raised", P.Status.LOST: "lost",
            P.Status.TIMEOUT: "timeout", P.Status.MEMORY: "memory", P.Status.CANCELLED: "cancelled"}


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
