"""The zpar wire: every message kind, its header fields and its frame layout.

Nothing else in zpar builds or parses frames. A message is a ZeroMQ multipart
message: one msgpack header frame, then zero or more payload frames that the
broker forwards untouched::

    producer                broker                      agent            worker
       | HELLO ------------->  |                          |                 |
       | <----------- WELCOME  | <------------------ HELLO|                 |
       |                       | WELCOME ---------------> |                 |
       |                       | <----------- READY(n)    |   <------ HELLO |
       | SUBMIT(funcs,tasks) ->| TASKS(funcs,tasks) ----> | TASKS --------> |
       |                       | <- RESULT (collector) -- | <------- RESULT |
       | <-------------- RESULT|                          |                 |
       | <--- ITEMS (streams)  | <- ITEMS (collector) --- | <-------- ITEMS |
       | FEED (sends, credits)>| FEED ------------------> | FEED ---------> |
       | STATUS ------------>  |                          |                 |
       | <------------ STATUS  | <-> HEARTBEAT            |                 |
       | BYE ----------------> | <------------------- BYE |                 |

Header: ``{"v": VERSION, "k": Kind, ...fields}``. SUBMIT and TASKS carry the
function blobs named in ``funcs`` first, then each task's frames in order
(its pickled arguments, then its out-of-band buffers). RESULT carries each
result's frames in order; ITEMS and FEED (zpar.streaming), each object's, and
they route by task id like RESULT. A message of the wrong version, kind, shape
or frame count raises ProtocolError; callers drop and count it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import msgpack

from .errors import ProtocolError

VERSION = 1
#: Largest header frame a peer may send (payload frames are capped separately).
MAX_HEADER_BYTES = 8 * 1024 * 1024
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


class Role(str, enum.Enum):
    PRODUCER = "producer"
    AGENT = "agent"
    WORKER = "worker"


class Status(enum.IntEnum):
    """How a task ended, as carried in a RESULT entry."""

    OK = 0  # payload: the pickled return value and its buffers
    RAISED = 1  # payload: the pickled exception record (see serialize.py)
    LOST = 2  # payload: one UTF-8 reason (worker or node died); retried by the broker
    TIMEOUT = 3  # payload: one UTF-8 reason (the task ran past its timeout); not retried
    CANCELLED = 4  # payload: one UTF-8 reason (stopped on request); not retried
    MEMORY = 5  # payload: one UTF-8 reason (its worker went past the memory limit); not retried
    STREAMED = 6  # payload: the pickled ``(items sent, return value)`` of a task that sent items (zpar.streaming)


_STATUSES = frozenset(int(s) for s in Status)

#: Task flags, a bit field in each task entry.
FLAG_CHUNK = 1  # the arguments are a list of argument tuples; return a list
FLAG_CHANNEL = 2  # client.start: the function gets the task's channel as its first argument

#: Stream flow control (zpar.streaming): a sender may be this many items ahead of
#: what the receiver has taken (credits move the limit on: ``upto`` = taken + window) ...
STREAM_WINDOW = 256
#: ... and stops while this many bytes it sent are unread (a larger object still goes, alone).
STREAM_BYTES = 8 << 20

#: A payload of one frame up to this size travels inside the header instead
#: (``nframes`` 0, bytes in ``data``): a batch of tiny tasks is then one frame,
#: not one frame per task, on every hop.
INLINE_MAX = 32 * 1024


class TaskEntry(NamedTuple):
    """One task in SUBMIT or TASKS: ``[id, digest, nframes, flags, data, retries, timeout_ms]``.

    The task's payload (pickled arguments, then out-of-band buffers) is either
    ``data`` (when ``nframes`` is 0) or the next ``nframes`` payload frames.
    ``retries``: how many more times the broker runs it after losing it to a
    dead worker or node. ``timeout_ms``: the agent stops it after this long
    running (0: never).
    """

    id: int
    digest: bytes
    nframes: int
    flags: int = 0
    data: bytes = b""
    retries: int = 0
    timeout_ms: int = 0


class ResultEntry(NamedTuple):
    """One result in RESULT: ``[id, status, nframes, duration_us, data]`` on the wire.

    ``status`` is a Status value; the payload is placed as in TaskEntry.
    """

    id: int
    status: int
    nframes: int
    duration_us: int = 0
    data: bytes = b""


class ItemEntry(NamedTuple):
    """One object in ITEMS or FEED: ``[id, seq, nframes, data]``, its payload placed as in TaskEntry.

    ``seq`` counts the objects of one task in one direction from 0; a receiver
    drops a repeat and treats a gap as a loss.
    """

    id: int
    seq: int
    nframes: int
    data: bytes = b""


class Credit(NamedTuple):
    """``[id, upto]``: the receiver has room for the task's objects with ``seq < upto`` (cumulative)."""

    id: int
    upto: int


def pack_payload(frames: Sequence[Any]) -> tuple[int, bytes, Sequence[Any]]:
    """``(nframes, data, frames)`` for an entry: small single-frame payloads go inline."""
    if len(frames) == 1 and len(frames[0]) <= INLINE_MAX:
        head = frames[0]
        return 0, head if type(head) is bytes else bytes(head), ()
    return len(frames), b"", frames


def unpack_payload(entry: TaskEntry | ResultEntry | ItemEntry, frames: Sequence[Any], pos: int) -> tuple[Sequence[Any], int]:
    """The payload frames of ``entry`` starting at ``frames[pos]``, and the next position."""
    n = entry.nframes
    if n == 0:
        return (entry.data,), pos
    return frames[pos:pos + n], pos + n


# --------------------------------------------------------------------------
# Messages. Each knows its kind and how to move between a dataclass and the
# header dict; frames travel beside the header, never inside it.


@dataclass(frozen=True, slots=True)
class Hello:
    kind: ClassVar[Kind] = Kind.HELLO
    role: Role
    name: str = ""
    host: str = ""
    pid: int = 0
    workers: int = 0


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
    funcs: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Tasks:
    kind: ClassVar[Kind] = Kind.TASKS
    tasks: tuple[TaskEntry, ...]
    funcs: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Ready:
    kind: ClassVar[Kind] = Kind.READY
    credits: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    kind: ClassVar[Kind] = Kind.HEARTBEAT
    busy: int = 0  # from an agent: workers running a task now


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
class StatusMsg:
    """A request (info empty) or the broker's answer (info filled)."""

    kind: ClassVar[Kind] = Kind.STATUS
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Bye:
    kind: ClassVar[Kind] = Kind.BYE
    reason: str = ""
    agent: bytes = b""  # from an agent over the collector, behind its last results


@dataclass(frozen=True, slots=True)
class Error:
    """The broker telling a peer that what it sent was refused, and why."""

    kind: ClassVar[Kind] = Kind.ERROR
    message: str
    ids: tuple[int, ...] = ()


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


Message = (Hello | Welcome | Submit | Tasks | Ready | Heartbeat | Result | Cancel | StatusMsg | Bye | Error | Ack
           | Items | Feed)


# --------------------------------------------------------------------------
# Encoding


def encode(msg: Message) -> bytes:
    """The header frame for ``msg``."""
    k = msg.kind
    h: dict[str, Any] = {"v": VERSION, "k": int(k)}
    if k is Kind.SUBMIT or k is Kind.TASKS:
        h["t"] = msg.tasks  # type: ignore[union-attr]  # NamedTuples pack as arrays
        h["f"] = list(msg.funcs)  # type: ignore[union-attr]
    elif k is Kind.RESULT:
        h["r"] = msg.results  # type: ignore[union-attr]
        if msg.agent:  # type: ignore[union-attr]
            h["a"] = msg.agent  # type: ignore[union-attr]
        if msg.epoch:  # type: ignore[union-attr]
            h["e"] = msg.epoch  # type: ignore[union-attr]
    elif k is Kind.HELLO:
        h.update(role=msg.role.value, name=msg.name, host=msg.host, pid=msg.pid, workers=msg.workers)  # type: ignore[union-attr]
    elif k is Kind.WELCOME:
        h.update(
            epoch=msg.epoch,  # type: ignore[union-attr]
            heartbeat=msg.heartbeat,  # type: ignore[union-attr]
            liveness=msg.liveness,  # type: ignore[union-attr]
            collector=msg.collector,  # type: ignore[union-attr]
            max_message_size=msg.max_message_size,  # type: ignore[union-attr]
        )
    elif k is Kind.READY:
        h["n"] = msg.credits  # type: ignore[union-attr]
    elif k is Kind.HEARTBEAT:
        h["busy"] = msg.busy  # type: ignore[union-attr]
    elif k is Kind.CANCEL:
        h["ids"] = list(msg.ids)  # type: ignore[union-attr]
        h["force"] = msg.force  # type: ignore[union-attr]
    elif k is Kind.STATUS:
        h["info"] = msg.info  # type: ignore[union-attr]
    elif k is Kind.BYE:
        h["reason"] = msg.reason  # type: ignore[union-attr]
        if msg.agent:  # type: ignore[union-attr]
            h["a"] = msg.agent  # type: ignore[union-attr]
    elif k is Kind.ACK:
        h["ids"] = list(msg.ids)  # type: ignore[union-attr]
    elif k is Kind.ERROR:
        h["message"] = msg.message  # type: ignore[union-attr]
        h["ids"] = list(msg.ids)  # type: ignore[union-attr]
    elif k is Kind.ITEMS:
        h["i"] = msg.items  # type: ignore[union-attr]
        h["c"] = msg.credits  # type: ignore[union-attr]
        if msg.agent:  # type: ignore[union-attr]
            h["a"] = msg.agent  # type: ignore[union-attr]
        if msg.epoch:  # type: ignore[union-attr]
            h["e"] = msg.epoch  # type: ignore[union-attr]
    elif k is Kind.FEED:
        h["i"] = msg.items  # type: ignore[union-attr]
        h["c"] = msg.credits  # type: ignore[union-attr]
        h["closed"] = list(msg.closed)  # type: ignore[union-attr]
    return msgpack.packb(h, use_bin_type=True)


# --------------------------------------------------------------------------
# Decoding: every field checked, because the other end may be anyone.


def _get(h: dict, key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in h:
        if default is ...:
            raise ProtocolError(f"header field {key!r} is missing")
        return default
    value = h[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is int:
        raise ProtocolError(f"header field {key!r} has type {type(value).__name__}")
    return value


def _nonneg_int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ProtocolError(f"{what} must be a non-negative integer")
    return value


def _tasks(h: dict) -> tuple[tuple[TaskEntry, ...], tuple[bytes, ...], int]:
    rows = _get(h, "t", list)
    if len(rows) > MAX_ENTRIES:
        raise ProtocolError(f"{len(rows)} task entries is over the {MAX_ENTRIES} limit")
    funcs = _get(h, "f", list, [])
    if len(funcs) > MAX_ENTRIES:
        raise ProtocolError(f"{len(funcs)} functions is over the {MAX_ENTRIES} limit")
    for d in funcs:
        if type(d) is not bytes:
            raise ProtocolError("function digests must be bytes")
    out = []
    total = len(funcs)
    for row in rows:
        if type(row) is not list or len(row) != 7:
            raise ProtocolError("a task entry must be [id, digest, nframes, flags, data, retries, timeout_ms]")
        tid, digest, nframes, flags, data, retries, timeout_ms = row
        if (type(tid) is not int or tid < 0 or type(digest) is not bytes or type(nframes) is not int
                or nframes < 0 or type(flags) is not int or flags < 0 or type(data) is not bytes
                or type(retries) is not int or not 0 <= retries <= MAX_RETRIES
                or type(timeout_ms) is not int or timeout_ms < 0):
            raise ProtocolError(f"malformed task entry {row!r:.200}")
        if nframes == 0 and not data:
            raise ProtocolError("a task needs its arguments, inline or in frames")
        total += nframes
        out.append(TaskEntry(tid, digest, nframes, flags, data, retries, timeout_ms))
    return tuple(out), tuple(funcs), total


def _results(h: dict) -> tuple[tuple[ResultEntry, ...], int]:
    rows = _get(h, "r", list)
    if len(rows) > MAX_ENTRIES:
        raise ProtocolError(f"{len(rows)} result entries is over the {MAX_ENTRIES} limit")
    out = []
    total = 0
    for row in rows:
        if type(row) is not list or len(row) != 5:
            raise ProtocolError("a result entry must be [id, status, nframes, duration_us, data]")
        rid, status, nframes, dur, data = row
        if (type(rid) is not int or rid < 0 or type(status) is not int or status not in _STATUSES
                or type(nframes) is not int or nframes < 0 or type(dur) is not int or dur < 0
                or type(data) is not bytes):
            raise ProtocolError(f"malformed result entry {row!r:.200}")
        if nframes == 0 and not data:
            raise ProtocolError("a result needs its value, inline or in frames")
        total += nframes
        out.append(ResultEntry(rid, status, nframes, dur, data))
    return tuple(out), total


def _items(h: dict) -> tuple[tuple[ItemEntry, ...], tuple[Credit, ...], int]:
    rows = _get(h, "i", list)
    credits = _get(h, "c", list, [])
    if len(rows) > MAX_ENTRIES or len(credits) > MAX_ENTRIES:
        raise ProtocolError(f"more than {MAX_ENTRIES} item or credit entries")
    out = []
    total = 0
    for row in rows:
        if type(row) is not list or len(row) != 4:
            raise ProtocolError("an item entry must be [id, seq, nframes, data]")
        iid, seq, nframes, data = row
        if (type(iid) is not int or iid < 0 or type(seq) is not int or seq < 0 or type(nframes) is not int
                or nframes < 0 or type(data) is not bytes):
            raise ProtocolError(f"malformed item entry {row!r:.200}")
        if nframes == 0 and not data:
            raise ProtocolError("an item needs its value, inline or in frames")
        total += nframes
        out.append(ItemEntry(iid, seq, nframes, data))
    cout = []
    for row in credits:
        if type(row) is not list or len(row) != 2:
            raise ProtocolError("a credit entry must be [id, upto]")
        cout.append(Credit(_nonneg_int(row[0], "task id"), _nonneg_int(row[1], "credit")))
    return tuple(out), tuple(cout), total


def decode(header: bytes | memoryview, nframes: int = 0) -> Message:
    """Parse a header frame; ``nframes`` is how many payload frames came with it.

    Raises ProtocolError for anything but a well-formed message of this version
    whose frame count matches what its header declares.
    """
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes is over the {MAX_HEADER_BYTES} limit")
    if nframes > MAX_FRAMES:
        raise ProtocolError(f"{nframes} frames is over the {MAX_FRAMES} limit")
    try:
        h = msgpack.unpackb(header, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if type(h) is not dict:
        raise ProtocolError("header is not a map")
    v = h.get("v")
    if v != VERSION or type(v) is not int:
        raise ProtocolError(f"protocol version {v!r} is not {VERSION}; upgrade the older side")
    try:
        k = Kind(_get(h, "k", int))
    except ValueError:
        raise ProtocolError(f"unknown message kind {h.get('k')!r}") from None

    expected = 0
    msg: Message
    if k is Kind.SUBMIT or k is Kind.TASKS:
        tasks, funcs, expected = _tasks(h)
        msg = (Submit if k is Kind.SUBMIT else Tasks)(tasks, funcs)
    elif k is Kind.RESULT:
        results, expected = _results(h)
        msg = Result(results, _get(h, "a", bytes, b""), _get(h, "e", str, ""))
    elif k is Kind.HELLO:
        try:
            role = Role(_get(h, "role", str))
        except ValueError:
            raise ProtocolError(f"unknown role {h.get('role')!r}") from None
        msg = Hello(
            role,
            _get(h, "name", str, ""),
            _get(h, "host", str, ""),
            _nonneg_int(_get(h, "pid", int, 0), "pid"),
            _nonneg_int(_get(h, "workers", int, 0), "workers"),
        )
    elif k is Kind.WELCOME:
        msg = Welcome(
            _get(h, "epoch", str),
            float(_get(h, "heartbeat", (int, float))),
            _nonneg_int(_get(h, "liveness", int), "liveness"),
            _get(h, "collector", str, ""),
            _nonneg_int(_get(h, "max_message_size", int, 0), "max_message_size"),
        )
    elif k is Kind.READY:
        msg = Ready(_nonneg_int(_get(h, "n", int), "credits"))
    elif k is Kind.HEARTBEAT:
        msg = Heartbeat(_nonneg_int(_get(h, "busy", int, 0), "busy"))
    elif k is Kind.CANCEL:
        ids = _get(h, "ids", list)
        msg = Cancel(tuple(_nonneg_int(i, "task id") for i in ids), _get(h, "force", bool, False))
    elif k is Kind.STATUS:
        msg = StatusMsg(_get(h, "info", dict, {}))
    elif k is Kind.BYE:
        msg = Bye(_get(h, "reason", str, ""), _get(h, "a", bytes, b""))
    elif k is Kind.ACK:
        msg = Ack(tuple(_nonneg_int(i, "task id") for i in _get(h, "ids", list)))
    elif k is Kind.ITEMS:
        items, credits, expected = _items(h)
        msg = Items(items, credits, _get(h, "a", bytes, b""), _get(h, "e", str, ""))
    elif k is Kind.FEED:
        items, credits, expected = _items(h)
        closed = _get(h, "closed", list, [])
        if len(closed) > MAX_ENTRIES:
            raise ProtocolError(f"{len(closed)} closed ids is over the {MAX_ENTRIES} limit")
        msg = Feed(items, credits, tuple(_nonneg_int(i, "task id") for i in closed))
    else:  # Kind.ERROR
        ids = _get(h, "ids", list, [])
        msg = Error(_get(h, "message", str), tuple(_nonneg_int(i, "task id") for i in ids))
    if nframes != expected:
        raise ProtocolError(f"{k.name} declares {expected} payload frames but {nframes} came")
    return msg
