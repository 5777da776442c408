"""What the broker remembers of each task, producer and agent (core.py decides what to do with it)."""

from __future__ import annotations

import collections
import enum
from typing import Any

from zpar import protocol as P


class TaskState(enum.Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"


class TaskRecord:
    """A task as its producer sent it (``entry``, payload attached, forwarded as it is) and where it is."""

    __slots__ = ("agent", "attempts", "entry", "feed", "gid", "nbytes", "producer", "state", "streamed")

    def __init__(self, gid: int, producer: ProducerRecord, entry: P.TaskEntry) -> None:
        self.gid = gid
        self.producer = producer
        self.entry = entry  # its id is the producer's; the agent sees it under ``gid``
        self.nbytes = P.payload_bytes(entry.payload)
        self.state = TaskState.QUEUED
        self.agent: AgentRecord | None = None
        self.attempts = 0  # runs lost so far
        self.streamed = False  # it exchanged stream items (zpar.streaming): never run it again
        self.feed: Feed | None = None  # what its producer sent it before an agent had it

    @property
    def ptid(self) -> int:
        """The producer's id for the task."""
        return self.entry.id


class Feed:
    """FEED for a task still queued here: it follows the task to its agent."""

    __slots__ = ("closed", "items")

    def __init__(self) -> None:
        self.items: list[P.ItemEntry] = []  # already renumbered with the task's gid
        self.closed = False


class ProducerRecord:
    __slots__ = ("active", "funcs", "host", "id", "last_seen", "name", "queue", "tasks")

    def __init__(self, pid: bytes, now: float) -> None:
        self.id = pid
        self.name = ""
        self.host = ""
        self.funcs: dict[bytes, P.Frame] = {}  # digest -> function blob frame
        self.queue: collections.deque[TaskRecord] = collections.deque()
        self.tasks: dict[int, TaskRecord] = {}  # producer task id -> task, queued or assigned
        self.last_seen = now
        self.active = False  # in the broker's round-robin of producers with queued tasks

    def label(self) -> str:
        return self.name or self.id.hex()


class AgentRecord:
    __slots__ = ("assigned", "busy", "credits", "host", "id", "last_seen", "name", "pid", "shipped", "workers")

    def __init__(self, aid: bytes, hello: P.Hello, now: float) -> None:
        self.id = aid
        self.name = hello.name or aid.hex()
        self.host = hello.host
        self.pid = hello.pid
        self.workers = hello.workers
        self.busy = 0
        self.credits = 0
        self.shipped = P.Shipped()  # the function blobs this agent already has
        self.assigned: dict[int, TaskRecord] = {}
        self.last_seen = now


def status_of(agent: AgentRecord, now: float) -> dict[str, Any]:
    """One node's line in the broker's status."""
    return {
        "name": agent.name,
        "host": agent.host,
        "pid": agent.pid,
        "workers": agent.workers,
        "busy": min(agent.busy, agent.workers),
        "idle": max(0, agent.workers - agent.busy),
        "running": len(agent.assigned),
        "credits": agent.credits,
        "last_seen_s": round(now - agent.last_seen, 3),
    }
