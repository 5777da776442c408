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
    __slots__ = ("gid", "producer", "ptid", "digest", "flags", "data", "frames", "nbytes", "state", "agent",
                 "retries", "timeout_ms", "attempts", "streamed", "feed")

    def __init__(self, gid: int, producer: "ProducerRecord", entry: P.TaskEntry, frames: list[Any]) -> None:
        self.gid = gid
        self.producer = producer
        self.ptid = entry.id
        self.digest = entry.digest
        self.flags = entry.flags
        self.data = entry.data  # the payload, when small enough to ride in the header
        self.frames = frames
        self.nbytes = len(entry.data) + sum(len(f) for f in frames) if frames else len(entry.data)
        self.state = TaskState.QUEUED
        self.agent: AgentRecord | None = None
        self.retries = entry.retries  # re-runs allowed after losing it to a dead worker or node
        self.timeout_ms = entry.timeout_ms
        self.attempts = 0  # runs lost so far
        self.streamed = False  # it exchanged stream items (zpar.streaming): never run it again
        self.feed: Feed | None = None  # what its producer sent it before an agent had it


class Feed:
    """FEED for a task still queued here: it follows the task to its agent."""

    __slots__ = ("closed", "frames", "items")

    def __init__(self) -> None:
        self.items: list[P.ItemEntry] = []  # already renumbered with the task's gid
        self.frames: list[Any] = []
        self.closed = False


class ProducerRecord:
    __slots__ = ("id", "name", "host", "funcs", "queue", "tasks", "last_seen", "active")

    def __init__(self, pid: bytes, now: float) -> None:
        self.id = pid
        self.name = ""
        self.host = ""
        self.funcs: dict[bytes, Any] = {}  # digest -> function blob frame
        self.queue: collections.deque[TaskRecord] = collections.deque()
        self.tasks: dict[int, TaskRecord] = {}  # producer task id -> task, queued or assigned
        self.last_seen = now
        self.active = False  # in the broker's round-robin of producers with queued tasks


class AgentRecord:
    __slots__ = ("id", "name", "host", "pid", "workers", "busy", "credits", "known", "assigned", "last_seen")

    def __init__(self, aid: bytes, hello: P.Hello, now: float) -> None:
        self.id = aid
        self.name = hello.name or aid.hex()
        self.host = hello.host
        self.pid = hello.pid
        self.workers = hello.workers
        self.busy = 0
        self.credits = 0
        self.known: set[bytes] = set()  # function digests this agent already has
        self.assigned: dict[int, TaskRecord] = {}
        self.last_seen = now
