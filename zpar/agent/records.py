"""What the agent's core keeps per worker and per task: one registry entry each (``Slots.workers``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from zpar import protocol as P


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # told to exit between tasks (recycling); a new worker takes its place
    EXITED = "exited"


@dataclass(slots=True)
class QueuedTask:
    """A task from the broker (``entry``, passed on to a worker as it came) and what the agent knows of it."""

    entry: P.TaskEntry
    alone: bool = False  # suspected of killing a worker: run it by itself
    streamed: bool = False  # it sent or was given an item: never run it again
    inbox: list[P.ItemEntry] | None = None  # FEED for it before a worker had it
    closed: bool = False  # ... and its producer closed its input
    assembly: P.Assembly | None = None  # the parts of its payload come so far (P.Part), when it has parts

    @property
    def id(self) -> int:
        return self.entry.id


@dataclass(slots=True)
class WorkerSlot:
    """One worker process, from its spawn to its death (then it leaves the registry)."""

    identity: bytes
    state: WorkerState = WorkerState.STARTING
    pid: int = 0  # from its HELLO
    batch: list[QueuedTask] = field(default_factory=list)
    shipped: P.Shipped = field(default_factory=P.Shipped)  # the function blobs this worker has
    deadline: float = 0.0  # when its task runs out of time (0: no timeout)
    doomed: dict[int, tuple[P.Status, P.Cause]] = field(default_factory=dict)  # task id -> why: being killed
    stale: bool = False  # its batch came from a broker that is gone: drop its results
    tasks_done: int = 0
    retire: bool = False  # recycle it once its batch is done
    kill_at: float = 0.0  # SIGTERM was sent: SIGKILL at this time if it is still there (0: not asked)
    rss_checked: float = float("-inf")  # when its memory was last read between tasks
