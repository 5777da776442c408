"""What the broker remembers of each task, producer and agent (core.py decides what to do with it)."""

from __future__ import annotations

import collections
import enum
import os
import socket
from collections.abc import Iterable
from typing import Any, TypeVar

from zpar import protocol as P
from zpar._text import printable

from .limits import Functions
from .objects import NodeObjects, Objects
from .objects import status as objects_status
from .outgoing import Dest, Outgoing
from .queues import TaskQueue

#: What a task asks for (``Sched.resources``: sorted ``(name, amount)`` pairs); its tasks queue together.
Shape = tuple[tuple[str, float], ...]


class TaskState(enum.Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    #: Left the broker (cancelled, or finished elsewhere) while queued: a tombstone its producer's
    #: queue skips when it comes to it (cancelling is O(1), not a search of the queue).
    GONE = "gone"
    #: Waits for tasks whose values it takes as arguments (``Sched.deps``): queued once they all have one.
    WAITING = "waiting"


class TaskRecord:
    """A task as its producer sent it (``entry``, payload attached, forwarded as it is) and where it is."""

    __slots__ = ("agent", "assembly", "attempts", "dependents", "dispatched", "entry", "feed", "gid",
                 "holders", "nbytes", "producer", "state", "streamed", "submitted", "values", "waiting")

    def __init__(self, gid: int, producer: ProducerRecord, entry: P.TaskEntry, submitted: float = 0.0) -> None:
        self.gid = gid
        self.submitted = submitted  # wall clock: when the broker accepted it (the task history)
        self.dispatched = 0.0  # ... and when it last gave it to an agent
        self.producer = producer
        self.entry = entry  # its id is the producer's; the agent sees it under ``gid``
        self.nbytes = P.payload_bytes(entry.payload) + entry.part_bytes  # its parts' as declared (quotas)
        #: The PARTs of its payload come so far (entry.parts), kept to send again if it runs elsewhere.
        self.assembly = P.Assembly(entry) if entry.parts else None
        self.state = TaskState.QUEUED
        self.agent: AgentRecord | None = None
        self.holders: tuple[bytes, ...] = ()  # every agent it was given to: only they may end it
        self.attempts = 0  # runs lost so far
        self.streamed = False  # it exchanged stream items (zpar.streaming): never run it again
        self.feed: Feed | None = None  # what its producer sent it before an agent had it
        # Futures as arguments (Sched.deps): the tasks waiting for this one's value, each with the index of
        # the value among theirs; and for a waiting task, its values come so far (digests of objects it holds
        # for itself; b"" for one not come yet), and how many it still waits for.
        self.dependents: list[tuple[TaskRecord, int]] | None = None
        self.values: list[bytes] | None = None
        self.waiting = 0

    @property
    def ptid(self) -> int:
        """The producer's id for the task."""
        return self.entry.id

    @property
    def incomplete(self) -> bool:
        """Some PART of its payload has not come yet: its agent waits for it to start the task."""
        return self.assembly is not None and not self.assembly.complete

    def parts_for(self, agent: AgentRecord, parts: Iterable[P.Part] | None = None) -> list[Outgoing]:
        """PART messages for ``agent``, under the task's ``gid``: of ``parts`` (its producer's ids), or of every
        part come so far."""
        if parts is None:
            parts = self.assembly.received if self.assembly is not None else ()
        return [Outgoing(Dest.BACKEND, agent.id, P.Part(self.gid, part.seq, part.payload)) for part in parts]


class Feed:
    """FEED for a task still queued here: it follows the task to its agent. Its bytes count as queued."""

    __slots__ = ("closed", "items", "nbytes")

    def __init__(self) -> None:
        self.items: list[P.ItemEntry] = []  # already renumbered with the task's gid
        self.nbytes = 0
        self.closed = False


class ProducerRecord:
    __slots__ = ("active", "ended", "failed", "funcs", "host", "id", "last_seen", "name", "names", "objects",
                 "progress", "queue", "queued", "queued_bytes", "shaped", "submitted", "tasks",
                 "values", "waiting")

    def __init__(self, pid: bytes, now: float) -> None:
        self.id = pid
        self.name = ""
        self.host = ""
        self.funcs = Functions()  # digest -> function blob frame, verified
        self.names: dict[bytes, str] = {}  # digest -> the function's name, as the producer says (for history)
        self.submitted = self.ended = self.failed = 0  # its tasks accepted, ended (any way), ended not ok
        #: The same per function (digest -> [submitted, ended, failed]): the dashboard's progress of its maps.
        self.progress: dict[bytes, list[int]] = {}
        self.objects = Objects()  # digest -> scattered object's blob frame, verified (objects.py)
        # Its queued tasks that ask for no resources, by priority then arrival, and GONE tombstones among
        # them (skipped at dispatch); those that ask for resources, a queue per set of resources asked.
        self.queue = TaskQueue(TaskState.GONE)
        self.shaped: dict[Shape, TaskQueue] = {}
        self.queued = self.queued_bytes = 0  # live tasks in all its queues, and their payload bytes
        self.tasks: dict[int, TaskRecord] = {}  # producer task id -> task, queued, assigned or waiting
        self.waiting = 0  # those WAITING for other tasks' values: neither queued nor running
        #: Its ended tasks whose values are still kept for tasks that take them (Sched.deps): id -> object digest.
        self.values: dict[int, bytes] = {}
        self.last_seen = now
        self.active = False  # in the broker's round-robin of producers with queued tasks

    def label(self) -> str:
        return self.name or self.id.hex()

    def enqueue(self, task: TaskRecord, front: bool = False) -> None:
        """Queue ``task`` by its priority, after those of its level (``front``: before them: it was queued
        before and was given back or lost)."""
        task.state = TaskState.QUEUED
        sched = task.entry.sched
        if sched is None:
            self.queue.put(task, 0, front)
        elif not sched.resources:
            self.queue.put(task, sched.priority, front)
        else:
            queue = self.shaped.get(sched.resources)
            if queue is None:
                queue = self.shaped[sched.resources] = TaskQueue(TaskState.GONE)
            queue.put(task, sched.priority, front)
        self.queued += 1
        self.queued_bytes += task.nbytes

    def take(self, queue: TaskQueue) -> TaskRecord | None:
        """The next live task of ``queue`` (one of this producer's), out of it and out of the counts; None if
        only tombstones were left."""
        task = queue.take()
        if task is not None:
            self.queued -= 1
            self.queued_bytes -= task.nbytes
        return task

    def unqueue(self, task: TaskRecord) -> None:
        """``task`` leaves its queue where it is (a tombstone), in O(1) (see TaskQueue.tombstone)."""
        task.state = TaskState.GONE
        self.queued -= 1
        self.queued_bytes -= task.nbytes + (task.feed.nbytes if task.feed is not None else 0)
        sched = task.entry.sched
        if sched is not None and sched.resources:
            self.shaped[sched.resources].tombstone()
        else:
            self.queue.tombstone()

    def clear_queues(self) -> None:
        self.queue.clear()
        self.shaped.clear()
        self.queued = self.queued_bytes = 0


E = TypeVar("E", P.TaskEntry, P.ResultEntry, P.ItemEntry)


def note_names(prod: ProducerRecord, funcs: Iterable[P.Function], most: int) -> None:
    """Remember what ``prod`` calls these functions (printable, bounded); the oldest names go past ``most``."""
    for func in funcs:
        if func.name:
            prod.names[func.digest] = printable(func.name, P.MAX_NAME)
    while len(prod.names) > most:
        del prod.names[next(iter(prod.names))]


def renumbered(entry: E, new_id: int) -> E:
    """``entry`` under another task id (a hop's ids differ): ``_replace`` costs twice as much, per task."""
    return tuple.__new__(type(entry), (new_id, *entry[1:]))


class AgentRecord:
    """An agent and the tasks it holds (``assigned``: change it through ``hold``/``release``, which count bytes)."""

    __slots__ = ("assigned", "busy", "credits", "free", "held_bytes", "host", "id", "last_seen", "name", "objects",
                 "offered", "pid", "shipped", "stats", "workers")

    def __init__(self, aid: bytes, hello: P.Hello, now: float) -> None:
        self.id = aid
        self.name = hello.name or aid.hex()
        self.host = hello.host
        self.pid = hello.pid
        self.workers = hello.workers
        self.busy = 0
        self.credits = 0
        self.shipped = P.Shipped()  # the function blobs (and scattered objects) this agent already has
        self.objects = NodeObjects()  # the scattered objects among them, least recently used first
        self.assigned: dict[int, TaskRecord] = {}
        self.held_bytes = 0  # the payload bytes of the tasks in ``assigned``
        self.stats: P.NodeStats | None = None  # its machine's and workers' load, from its last heartbeat
        self.last_seen = now
        self.offered: dict[str, float] = {}  # the resources it offers (--resources) ...
        self.free: dict[str, float] = {}  # ... and those no task it holds has reserved
        self.offer(hello.resources)

    def offer(self, resources: Iterable[tuple[str, float]]) -> None:
        """What it offers (HELLO): what its tasks hold stays reserved."""
        self.offered = dict(resources)
        self.free = dict(self.offered)
        for task in self.assigned.values():
            self._reserve(task, -1)

    def hold(self, task: TaskRecord) -> None:
        """``task`` is this agent's now (prefetched or running): its resources are reserved until ``release``."""
        self.assigned[task.gid] = task
        self.held_bytes += task.nbytes
        sched = task.entry.sched
        if sched is not None and sched.resources:
            self._reserve(task, -1)

    def release(self, gid: int) -> TaskRecord | None:
        """The task no longer held here (None if it was not); its resources are free again."""
        task = self.assigned.pop(gid, None)
        if task is not None:
            self.held_bytes -= task.nbytes
            sched = task.entry.sched
            if sched is not None and sched.resources:
                self._reserve(task, 1)
        return task

    def release_all(self) -> None:
        self.assigned.clear()
        self.held_bytes = 0
        self.free = dict(self.offered)

    def _reserve(self, task: TaskRecord, sign: int) -> None:
        sched = task.entry.sched
        if sched is not None:
            free = self.free
            for name, amount in sched.resources:
                free[name] = free.get(name, 0) + sign * amount


#: Functions whose progress a producer's line keeps: past it, those with nothing left to run go first.
PROGRESS_FUNCTIONS = 32


def count_submitted(prod: ProducerRecord, digest: bytes) -> None:
    """One more task of function ``digest`` for ``prod``, in all and in its progress (kept to PROGRESS_FUNCTIONS
    functions)."""
    prod.submitted += 1
    counts = prod.progress.get(digest)
    if counts is None:
        if len(prod.progress) >= PROGRESS_FUNCTIONS:
            done = [d for d, (sub, end, _) in prod.progress.items() if end >= sub]
            for d in done[:max(1, len(done) // 2)] or [next(iter(prod.progress))]:
                del prod.progress[d]
        counts = prod.progress[digest] = [0, 0, 0]
    counts[0] += 1


def count_ended(prod: ProducerRecord, digest: bytes, ok: bool) -> None:
    """A task of ``prod`` ended (any way): its producer's and its function's counts."""
    prod.ended += 1
    counts = prod.progress.get(digest)
    if counts is not None:
        counts[1] += 1
    if not ok:
        prod.failed += 1
        if counts is not None:
            counts[2] += 1


def producer_status(prod: ProducerRecord, now: float) -> dict[str, Any]:
    """One producer's line in the broker's status: its tasks, in all and per function (the dashboard's progress
    of its maps)."""
    return {"name": prod.label(), "host": prod.host, "queued": prod.queued, "waiting": prod.waiting,
            "running": len(prod.tasks) - prod.queued - prod.waiting,
            "submitted": prod.submitted, "ended": prod.ended, "failed": prod.failed,
            "functions": [{"function": prod.names.get(d, d.hex()[:12]), "submitted": sub, "ended": end,
                           "failed": bad} for d, (sub, end, bad) in prod.progress.items()],
            "last_seen_s": round(now - prod.last_seen, 3)}


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
        "objects": len(agent.objects.sizes),  # scattered objects cached there now, and their bytes
        "object_bytes": agent.objects.nbytes,
        "objects_sent": agent.objects.sent,  # ... and sent there in all
        **({"resources": dict(agent.offered), "resources_free": dict(agent.free)} if agent.offered else {}),
        **_load(agent.stats),
    }


def _load(stats: P.NodeStats | None) -> dict[str, Any]:
    """A node's load for its status line: CPU (% of the machine), memory, and per worker pid, RSS and CPU."""
    if stats is None:
        return {}
    return {"cpu_percent": stats.cpu, "memory_used": stats.mem_used, "memory_total": stats.mem_total,
            "worker_load": [{"pid": w.pid, "rss": w.rss, "cpu_percent": w.cpu} for w in stats.workers]}


def report(now: float, epoch: str, started: float, security: str, agents: Iterable[AgentRecord],
           producers: Iterable[ProducerRecord], tasks: int, counters: collections.Counter[str]) -> dict[str, Any]:
    """The broker's status (``zpar status``, STATUS): nodes, workers busy and idle, queued, running, done."""
    producers = list(producers)
    queued = sum(p.queued for p in producers)
    waiting = sum(p.waiting for p in producers)  # for other tasks' values: neither queued nor running
    nodes = [status_of(a, now) for a in agents]
    return {
        "epoch": epoch,
        "broker": {"host": socket.gethostname(), "pid": os.getpid()},
        "uptime_s": round(now - started, 3),
        "security": security,
        "nodes": nodes,
        "workers": sum(n["workers"] for n in nodes),
        "busy": sum(n["busy"] for n in nodes),
        "producers": len(producers),
        "queued": queued,
        "waiting": waiting,
        "running": tasks - queued - waiting,
        "done": counters["done"],
        "failed": counters["failed"],
        "objects": objects_status(producers),  # scattered objects held for producers
        "counters": dict(counters),
    }
