"""The wire's vocabulary: limits, kinds, entries and one frozen dataclass per message (see zpar.protocol)."""

from __future__ import annotations

import enum
import hashlib
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeAlias

import zmq

VERSION = 2
#: Largest header frame a peer may send (payload frames are capped separately).
MAX_HEADER_BYTES = 2 * 1024 * 1024
#: Largest frame any socket takes (ZMQ_MAXMSGSIZE; a peer sending more is disconnected).
MAX_MESSAGE_SIZE = 1 << 30
#: Most payload frames in one message; guards against a flood of tiny frames.
MAX_FRAMES = 10_000
#: Most frames one task's arguments or result may take (senders split batches below MAX_FRAMES).
MAX_TASK_FRAMES = MAX_FRAMES // 4
#: Most task or result entries in one message (senders batch at most BATCH_MAX_TASKS):
#: a header claiming more is refused before any entry is looked at.
MAX_ENTRIES = 10_000
#: The most re-runs a task may ask for (a bound on what a peer can make us do).
MAX_RETRIES = 100
#: What one hop puts in one batch at most (tasks and payload bytes).
BATCH_MAX_TASKS = 1000
BATCH_MAX_BYTES = 1 << 20
#: A payload of one frame up to this size travels inside the header.
INLINE_MAX = 32 * 1024

#: Stream flow control (zpar.streaming): a sender may be this many items ahead of
#: what the receiver has taken (credits move the limit on: ``upto`` = taken + window) ...
STREAM_WINDOW = 4096
#: ... and stops while this many bytes it sent are unread (a larger object still goes, alone).
STREAM_BYTES = 8 << 20

#: One frame of a message: what ZeroMQ gave us, or what we hand it to send.
Frame: TypeAlias = "bytes | bytearray | memoryview | zmq.Frame"
#: A task's arguments, a result or a stream object: the pickle stream, then out-of-band buffers.
Payload: TypeAlias = Sequence[Frame]


class Kind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    SUBMIT = 3
    TASKS = 4
    READY = 5
    HEARTBEAT = 6
    RESULT = 7
    CANCEL = 8
    STATUS = 9
    BYE = 10
    ERROR = 11
    ACK = 12
    ITEMS = 13
    FEED = 14
    GIVE_BACK = 15
    RELEASE = 16
    PART = 17
    CONTROL = 18


class Role(str, enum.Enum):
    PRODUCER = "producer"
    AGENT = "agent"
    WORKER = "worker"


class Status(enum.IntEnum):
    """How a task ended, as carried in a RESULT entry."""

    OK = 0  # payload: the pickled return value and its buffers
    RAISED = 1  # payload: the pickled exception record (see serialize.py)
    LOST = 2  # cause: its worker or node died; retried by the broker
    TIMEOUT = 3  # cause: it ran past its timeout; not retried
    CANCELLED = 4  # cause: stopped on request; not retried
    MEMORY = 5  # cause: its worker went past the memory limit; not retried
    STREAMED = 6  # payload: the pickled ``(items sent, return value)`` of a task that sent items
    DEP_FAILED = 7  # cause: a task whose value it takes as an argument ended without one; it never ran


#: Statuses whose entry carries a value; the others carry a Cause instead.
VALUE_STATUSES = frozenset({Status.OK, Status.RAISED, Status.STREAMED})


class ErrorCode(enum.IntEnum):
    """Why the broker refused what a peer sent (ERROR); peers act on these, never on text."""

    MALFORMED = 1  # the message did not decode; it was dropped
    UNKNOWN_PEER = 2  # forgotten (silent too long) or from before a restart: say HELLO again
    UNKNOWN_FUNCTION = 3  # send these tasks again with their function blob
    KEY_REVOKED = 4  # this peer's key left the allow-list: it is cut off for good
    NOT_ALLOWED = 5  # this role may not send this kind of message
    BAD_FUNCTION = 6  # a function blob does not hash to its digest: it and these tasks are refused
    QUOTA_EXCEEDED = 7  # these tasks can never fit one of this producer's quotas (detail says which)
    TOO_MANY_PEERS = 8  # this key has as many producers connected as the broker allows: HELLO refused
    QUEUE_FULL = 9  # this producer's queue is at a quota for now: send these tasks again as results come back
    DEPENDENCY_GONE = 10  # these tasks wait for tasks the broker no longer holds (ended): send them with the values
    RESOURCE_UNAVAILABLE = 11  # no node offers the resources these tasks ask for, past their resource_timeout


class ByeReason(enum.IntEnum):
    """Why a peer says BYE."""

    LEAVING = 0  # a producer closing, an agent stopping
    STOPPING = 1  # the broker is stopping; it may come back
    KEY_REVOKED = 2  # the broker cut this peer off (its key was revoked)
    RECYCLED = 3  # the agent retires this worker between tasks


#: A task's arguments of at least PARTS_FROM bytes in more than one frame travel as a SUBMIT with
#: the first frame, then PART messages of about PART_BYTES each: each hop forwards a part as it
#: arrives, so the broker's and the agent's encrypted hops work at the same time instead of one
#: after the other (ZeroMQ hands a message over only once all its frames are in).
PARTS_FROM = 8 << 20
PART_BYTES = 4 << 20

#: The most workers a CONTROL may ask one agent to keep.
MAX_WORKERS = 4096

#: Most scattered objects (zpar.Client.scatter) one task may refer to.
MAX_REFS = 256

#: Task flags, a bit field in each task entry (1 was a chunk of calls; chunks are _wrappers.Chunk now).
FLAG_CHANNEL = 2  # client.start: the function gets the task's channel as its first argument


# --------------------------------------------------------------------------
# Entries: the rows of a batch, each with its payload frames attached.


class Function(NamedTuple):
    """A function blob (cloudpickle), named by its digest; travels once per hop. ``name``: the function's
    qualified name, from its producer, for people (the broker's task history); "" on the other hops."""

    digest: bytes
    blob: Frame
    name: str = ""


def digest(blob: Frame) -> bytes:
    """The name a function blob goes by on every hop: its BLAKE2b-128. Every hop that caches a
    blob checks it against the name it came with (one producer cannot change what another's digest runs)."""
    return hashlib.blake2b(blob.buffer if isinstance(blob, zmq.Frame) else blob, digest_size=16).digest()


class Shipped:
    """The function digests one peer already has: each blob goes to it once (SUBMIT, TASKS).

    Used on every hop: the producer toward its broker, the broker toward each
    agent, the agent toward each worker.
    """

    __slots__ = ("known",)

    def __init__(self) -> None:
        self.known: set[bytes] = set()

    def functions(self, entries: Iterable[TaskEntry], blob: Callable[[bytes], Frame]) -> tuple[Function, ...]:
        """The blobs (``blob(digest)``) of ``entries``' functions and scattered objects (``refs``) the peer
        lacks, now counted as sent."""
        out: list[Function] = []
        known = self.known
        for entry in entries:
            digest = entry.digest
            if digest not in known:
                known.add(digest)
                out.append(Function(digest, blob(digest)))
            if entry.refs:  # objects go the way functions go: once per peer, by digest
                for digest in entry.refs:
                    if digest not in known:
                        known.add(digest)
                        out.append(Function(digest, blob(digest)))
        return tuple(out)

    def forget(self, digests: Iterable[bytes] | None = None) -> None:
        """The peer lost these (or, with None, all): send them again with the next task that needs them."""
        if digests is None:
            self.known.clear()
        else:
            self.known.difference_update(digests)


#: Most resources one task may ask for, or one agent offer (``Sched.resources``, ``Hello.resources``).
MAX_RESOURCES = 32
#: The longest resource name ("gpu", "memory", "licence-matlab").
MAX_RESOURCE_NAME = 64
#: Most tasks one task may wait for (``Sched.deps``); their values ride as ``refs`` beyond MAX_REFS.
MAX_DEPS = 1024
#: Priorities a task may have (``Sched.priority``): higher runs first, within its producer.
MIN_PRIORITY, MAX_PRIORITY = -(1 << 31), (1 << 31) - 1


class Sched(NamedTuple):
    """How a task is scheduled, when it asks for more than the default (arrival order, any worker, no waits).
    Wire: ``[priority, {resource: amount}, resource_timeout_ms, deps, values]``.

    ``priority``: higher first among its producer's queued tasks (default 0);
    producers stay served in turn whatever their priorities. ``resources``:
    what it needs free on a node while it runs (``(name, amount)`` pairs,
    names sorted; an agent offers them with ``--resources``). ``resource_timeout_ms``:
    it fails if no node could take it for this long (0: it waits). ``deps``: the
    producer's ids of the tasks whose values it takes as arguments: it is
    queued once they all ended well (producer to broker). ``values``: the last
    ``values`` digests of the entry's ``refs`` are those tasks' values, in
    ``deps`` order, as objects (``zpar._refs``): the broker appends them when
    it queues the task (and forwards it with ``deps`` empty); a producer sends
    them itself for tasks that ended before the broker saw this one.
    """

    priority: int = 0
    resources: tuple[tuple[str, float], ...] = ()
    resource_timeout_ms: int = 0
    deps: tuple[int, ...] = ()
    values: int = 0


def waiting_for(sched: Sched | None, deps: tuple[int, ...]) -> Sched:
    """``sched`` (None: the default) for a task that takes the values of the producer's tasks ``deps``."""
    return (sched or Sched())._replace(deps=deps)


class TaskEntry(NamedTuple):
    """One task in SUBMIT or TASKS. Wire: ``[id, digest, nframes, flags, data, retries, timeout_ms]``,
    then ``refs`` when it has any, then ``parts, part_bytes`` (``refs`` an empty list) when it has parts,
    then ``sched`` (``refs`` and ``parts`` empty) when it has one.

    ``retries``: how many more times the broker runs it after losing it to a
    dead worker or node. ``timeout_ms``: the agent stops it after this long
    running (0: never). ``refs``: the digests of the scattered objects its
    arguments refer to (zpar.Client.scatter); their blobs travel beside the
    function blobs, once per peer. ``parts``: how many PART messages follow
    with the rest of its payload (``part_bytes`` in all); it runs once every
    one has come (see PARTS_FROM). ``sched``: its priority, resources and
    dependencies (``Sched``), None for the default.
    """

    id: int
    digest: bytes
    payload: Payload
    flags: int = 0
    retries: int = 0
    timeout_ms: int = 0
    refs: tuple[bytes, ...] = ()
    parts: int = 0
    part_bytes: int = 0
    sched: Sched | None = None


class Cause(NamedTuple):
    """Why a run ended without a value (LOST, TIMEOUT, CANCELLED, MEMORY), as data.

    ``exitcode``/``signal``: how the worker process ended, when it did (a
    signal number, or an exit code; None if not known). ``attempts``: runs
    lost so far (the broker fills it in when it gives up). ``detail``: words
    for people only (a limit, a duration); no peer parses it.
    Wire: ``[node, pid, exitcode, signal, attempts, detail]``.
    """

    node: str = ""
    pid: int = 0
    exitcode: int | None = None
    signal: int | None = None
    attempts: int = 0
    detail: str = ""

    def ended(self) -> str:
        """How the worker process ended, in words ("killed by SIGKILL"), or "" if it did not."""
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        if self.exitcode is not None:
            return f"exited with code {self.exitcode}"
        return ""

    @classmethod
    def from_returncode(cls, node: str, pid: int, returncode: int, detail: str = "") -> Cause:
        """The cause for a worker that ended with ``returncode`` (negative: killed by that signal)."""
        if returncode < 0:
            return cls(node, pid, None, -returncode, detail=detail)
        return cls(node, pid, returncode, None, detail=detail)


#: The most characters of a function's name in SUBMIT (``Function.name``; a longer one is cut by its sender).
MAX_NAME = 256
#: The most characters of a failed task's traceback its RESULT carries as text (``ResultEntry.error``: the
#: end of it, where the error is); the producer gets the whole exception in the payload.
MAX_ERROR_TEXT = 4096


class ResultEntry(NamedTuple):
    """One result in RESULT. Wire: ``[id, status, nframes, duration_us, data, cause]``, then
    ``worker, error`` when either is set.

    A value status (VALUE_STATUSES) has a payload and no cause; the others a
    cause and no payload. ``worker``: the pid of the worker that ran it;
    ``error``: for RAISED, the traceback as text (at most MAX_ERROR_TEXT
    characters), which the broker shows without unpickling anything.
    """

    id: int
    status: Status
    payload: Payload = ()
    duration_us: int = 0
    cause: Cause | None = None
    worker: int = 0
    error: str = ""


class ItemEntry(NamedTuple):
    """One object in ITEMS or FEED. Wire: ``[id, seq, nframes, data]``.

    ``seq`` counts the objects of one task in one direction from 0; a receiver
    drops a repeat and treats a gap as a loss.
    """

    id: int
    seq: int
    payload: Payload


class Credit(NamedTuple):
    """``[id, upto]``: the receiver has room for the task's objects with ``seq < upto`` (cumulative)."""

    id: int
    upto: int


# --------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Hello:
    kind: ClassVar[Kind] = Kind.HELLO
    role: Role
    name: str = ""
    host: str = ""
    pid: int = 0
    workers: int = 0
    #: From an agent: what its node offers tasks (``--resources``): ``(name, amount)`` pairs, names sorted.
    resources: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Welcome:
    kind: ClassVar[Kind] = Kind.WELCOME
    epoch: str
    heartbeat: float
    liveness: int
    collector: str = ""
    max_message_size: int = 0


@dataclass(frozen=True, slots=True)
class Submit:
    kind: ClassVar[Kind] = Kind.SUBMIT
    tasks: tuple[TaskEntry, ...]
    funcs: tuple[Function, ...] = ()


@dataclass(frozen=True, slots=True)
class Tasks:
    kind: ClassVar[Kind] = Kind.TASKS
    tasks: tuple[TaskEntry, ...]
    funcs: tuple[Function, ...] = ()


@dataclass(frozen=True, slots=True)
class Ready:
    kind: ClassVar[Kind] = Kind.READY
    credits: int


class WorkerStats(NamedTuple):
    """One worker process as its agent measured it last: ``[pid, rss, cpu]`` (bytes; % of one core)."""

    pid: int
    rss: int
    cpu: float


class NodeStats(NamedTuple):
    """A node's load, from its agent's heartbeat: ``[cpu, mem_used, mem_total, workers]`` (% of the whole
    machine, bytes, bytes, one WorkerStats each); for the dashboard."""

    cpu: float
    mem_used: int
    mem_total: int
    workers: tuple[WorkerStats, ...] = ()


@dataclass(frozen=True, slots=True)
class Heartbeat:
    kind: ClassVar[Kind] = Kind.HEARTBEAT
    busy: int = 0  # from an agent: workers running a task now
    stats: NodeStats | None = None  # from an agent: its machine's and workers' load


@dataclass(frozen=True, slots=True)
class Result:
    kind: ClassVar[Kind] = Kind.RESULT
    results: tuple[ResultEntry, ...]
    agent: bytes = b""  # set on the collector hop, where PULL hides the sender
    epoch: str = ""  # from an agent: the broker epoch its tasks came from (a restarted broker drops others)


@dataclass(frozen=True, slots=True)
class Cancel:
    kind: ClassVar[Kind] = Kind.CANCEL
    ids: tuple[int, ...]
    force: bool = False  # also stop tasks already running


@dataclass(frozen=True, slots=True)
class GiveBack:
    """These tasks will not run here soon: one before them runs long. Queue them again for a free worker.

    From a worker to its agent (tasks of its batch), and from an agent to the
    broker (tasks it prefetched; its unused credits go with them).
    """

    kind: ClassVar[Kind] = Kind.GIVE_BACK
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StatusMsg:
    """A request (info empty) or the broker's answer (info filled).

    A request may ask more (BrokerCore._asked): ``{"tasks": {"limit": n, "failed": bool}}`` the task
    history, ``{"dashboard": "start"}`` the embedded cluster's dashboard, ``{"scale": {"node": NAME,
    "workers": N}}`` a node resized (zpar.Client.scale; the answer's ``scale`` says how it went).
    """

    kind: ClassVar[Kind] = Kind.STATUS
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Bye:
    kind: ClassVar[Kind] = Kind.BYE
    reason: ByeReason = ByeReason.LEAVING
    agent: bytes = b""  # from an agent over the collector, behind its last results


@dataclass(frozen=True, slots=True)
class Error:
    """The broker telling a peer that what it sent was refused: ``code`` says why, ``detail`` is for people."""

    kind: ClassVar[Kind] = Kind.ERROR
    code: ErrorCode
    ids: tuple[int, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    """The broker has the results of these tasks: the agent may forget them."""

    kind: ClassVar[Kind] = Kind.ACK
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Items:
    """Objects a running task sent (a generator's yields, ``Channel.send``), on their way to its producer.

    Travels worker -> agent -> collector -> broker -> producer, the path of
    RESULT (so a task's items are ahead of its result). ``credits``: how far
    the task has read what its producer sent (FEED). ``agent``/``epoch`` as in
    Result.
    """

    kind: ClassVar[Kind] = Kind.ITEMS
    items: tuple[ItemEntry, ...]
    credits: tuple[Credit, ...] = ()
    agent: bytes = b""
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Feed:
    """Objects a producer sends to its running task, on their way to the worker holding it.

    Travels producer -> broker -> agent -> worker. ``credits``: how far the
    producer has read the task's items (ITEMS); ``closed``: tasks whose
    producer will send nothing more (after this message's items).
    """

    kind: ClassVar[Kind] = Kind.FEED
    items: tuple[ItemEntry, ...] = ()
    credits: tuple[Credit, ...] = ()
    closed: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Release:
    """Forget these scattered objects (zpar.Client.scatter): their producer dropped its references.

    Producer -> broker (its own objects), broker -> agent (objects no producer
    holds any more, or past the node's cache), agent -> worker.
    """

    kind: ClassVar[Kind] = Kind.RELEASE
    digests: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Part:
    """Frames of a task's payload that follow its SUBMIT or TASKS entry (``TaskEntry.parts``), in order.

    Producer -> broker (which keeps them, for a re-run elsewhere) -> the agent
    holding the task, forwarded as each arrives. ``seq`` counts a task's parts
    from 0; a receiver ignores a repeat (a task sent again after a reconnect).
    """

    kind: ClassVar[Kind] = Kind.PART
    id: int
    seq: int
    payload: Payload


class Action(str, enum.Enum):
    """What CONTROL asks of an agent (the dashboard's buttons)."""

    DRAIN = "drain"  # take no more tasks, finish those held (within the grace), then leave
    STOP = "stop"  # leave now: the tasks held go back to the broker, to run elsewhere (an attempt each)
    WORKERS = "workers"  # keep this many workers from now on (more start now; those past it end when idle)


@dataclass(frozen=True, slots=True)
class Control:
    """The broker steering an agent: ``action``, with ``workers`` for Action.WORKERS."""

    kind: ClassVar[Kind] = Kind.CONTROL
    action: Action
    workers: int = 0


Message: TypeAlias = (Hello | Welcome | Submit | Tasks | Ready | Heartbeat | Result | Cancel | StatusMsg | Bye
                      | Error | Ack | Items | Feed | GiveBack | Release | Part | Control)
