"""The rules of worker processes' lives and of the agent's own end, with no processes: each fed ``now``.

- ``Backoff``: a worker that dies before it is ready is started again after a
  delay that doubles (0.1 s up to 10 s), and resets once a worker says HELLO.
- ``terminate``/``overdue``: a worker to stop gets SIGTERM now and SIGKILL
  after a grace, if it is still there.
- ``MemoryLimit``: past the limit a worker is recycled between tasks; past
  1.5 x the limit, its running task is stopped (MEMORY) before the kernel's
  OOM killer takes the whole node's work with it.
- ``Drain``: the first SIGTERM stops taking work and waits for what is held,
  up to a grace; the second (or a grace of 0) stops at once.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

from .actions import Kill
from .records import WorkerSlot

log = logging.getLogger(__name__)

KILL_GRACE = 1.0  # seconds a worker stopped for a timeout, a cancel or memory gets after SIGTERM
SHUTDOWN_GRACE = 3.0  # seconds every worker gets after SIGTERM when the agent stops
MEMORY_CHECK_S = 0.1  # how often busy workers' memory is read, and at most how often between tasks
HARD_FACTOR = 1.5  # the running task is stopped past this multiple of the memory limit


class Backoff:
    """When to start again workers that die before they are ready."""

    FIRST = 0.1
    MAX = 10.0

    def __init__(self) -> None:
        self.delay = self.FIRST
        self._at: list[float] = []  # when each pending start is due

    def failed(self, now: float) -> float:
        """A worker died before it was ready: one start scheduled; returns its delay."""
        delay = self.delay
        self._at.append(now + delay)
        self.delay = min(delay * 2, self.MAX)
        return delay

    def ready(self) -> None:
        """A worker started: forget earlier failures."""
        self.delay = self.FIRST

    def due(self, now: float) -> int:
        """How many starts are due now (each counted once)."""
        if not self._at:
            return 0
        waiting = [t for t in self._at if t > now]
        due, self._at = len(self._at) - len(waiting), waiting
        return due

    def next_deadline(self) -> float:
        return min(self._at, default=float("inf"))


def terminate(slot: WorkerSlot, now: float, grace: float) -> Kill:
    """SIGTERM for ``slot`` now; ``overdue`` turns it into SIGKILL after ``grace`` seconds."""
    slot.kill_at = now + grace
    return Kill(slot.identity, signal.SIGTERM)


def overdue(slots: Iterable[WorkerSlot], now: float) -> list[Kill]:
    """SIGKILL for each worker still there past its grace (each once)."""
    out = []
    for slot in slots:
        if slot.kill_at and slot.kill_at <= now:
            slot.kill_at = 0.0
            out.append(Kill(slot.identity, signal.SIGKILL))
    return out


def next_kill(slots: Iterable[WorkerSlot]) -> float:
    return min((s.kill_at for s in slots if s.kill_at), default=float("inf"))


class MemoryLimit:
    """A worker's resident memory against ``mib`` (0: no limit)."""

    def __init__(self, mib: int, now: float) -> None:
        self.mib = mib
        self.soft = mib * 1024 * 1024
        self.hard = int(self.soft * HARD_FACTOR)
        self.next_watch = now if mib else float("inf")

    def watch_due(self, now: float) -> bool:
        """True every MEMORY_CHECK_S: time to read the busy workers' memory."""
        if now < self.next_watch:
            return False
        self.next_watch = now + MEMORY_CHECK_S
        return True

    def check_due(self, slot: WorkerSlot, now: float) -> bool:
        """True when ``slot``'s memory should be read as its results come in (counted as read now)."""
        if not self.mib or now - slot.rss_checked < MEMORY_CHECK_S:
            return False
        slot.rss_checked = now
        return bool(slot.pid)

    def over_soft(self, slot: WorkerSlot, rss: int) -> bool:
        if rss <= self.soft:
            return False
        log.info("worker pid %d uses %d MiB, over the %d MiB limit: recycling it", slot.pid, rss >> 20, self.mib)
        return True

    def over_hard(self, rss: int) -> str:
        """Why a task must stop (words for its Cause), or "" while ``rss`` is within the hard limit."""
        if rss <= self.hard:
            return ""
        return (f"used {rss >> 20} MiB, past the hard limit of {self.hard >> 20} MiB "
                f"({HARD_FACTOR:g} x --max-memory-per-worker)")


class Drain:
    """How SIGTERM and SIGINT end the agent: first drain within ``grace`` seconds, then stop now."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.signals = 0
        self.active = False
        self.until = 0.0  # while active: when the grace ends

    def signalled(self, now: float) -> bool:
        """A stop was asked: True to stop now, False when a drain begins."""
        self.signals += 1
        if self.signals > 1 or self.grace <= 0:
            return True
        self.active, self.until = True, now + self.grace
        return False

    def over(self, now: float, held: int) -> bool:
        """Draining and done: nothing is held any more, or the grace is spent."""
        return self.active and (held == 0 or now >= self.until)

    def next_deadline(self) -> float:
        return self.until if self.active else float("inf")
