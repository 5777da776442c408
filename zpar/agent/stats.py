"""A node's load for its heartbeats (the dashboard shows it): the machine's CPU and memory, and each
worker's memory and CPU, measured by psutil in the agent's shell (the core keeps no clock or process)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from zpar import protocol as P

if TYPE_CHECKING:
    import psutil


class NodeWatch:
    """Measures at each heartbeat; CPU figures are over the time since the last one (psutil's way, so the
    first heartbeat's are 0). psutil is imported at the first: 10 ms the agent's start goes without."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def stats(self, pids: Iterable[int]) -> P.NodeStats:
        import psutil

        memory = psutil.virtual_memory()
        workers = []
        seen = set()
        for pid in pids:
            seen.add(pid)
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                    proc.cpu_percent(None)  # its interval starts now: 0 this time
                workers.append(P.WorkerStats(pid, proc.memory_info().rss, round(proc.cpu_percent(None), 1)))
            except psutil.Error:  # it just ended: the next heartbeat goes without it
                self._procs.pop(pid, None)
        for gone in [pid for pid in self._procs if pid not in seen]:
            del self._procs[gone]
        return P.NodeStats(round(psutil.cpu_percent(None), 1), memory.total - memory.available, memory.total,
                           tuple(workers))
