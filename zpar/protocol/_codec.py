"""The wire's grammar: messages to frames and back, and the one batching rule (see zpar.protocol)."""

from __future__ import annotations

import enum
import itertools
import operator
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import msgpack
import zmq

from ..errors import ProtocolError
from ._messages import (
    BATCH_MAX_BYTES,
    BATCH_MAX_TASKS,
    INLINE_MAX,
    MAX_DEPS,
    MAX_ENTRIES,
    MAX_ERROR_TEXT,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_SIZE,
    MAX_NAME,
    MAX_PRIORITY,
    MAX_REFS,
    MAX_RESOURCE_NAME,
    MAX_RESOURCES,
    MAX_RETRIES,
    MAX_TASK_FRAMES,
    MAX_WORKERS,
    MIN_PRIORITY,
    VALUE_STATUSES,
    VERSION,
    Ack,
    Action,
    Bye,
    ByeReason,
    Cancel,
    Cause,
    Control,
    Credit,
    Error,
    ErrorCode,
    Feed,
    Frame,
    Function,
    GiveBack,
    Heartbeat,
    Hello,
    ItemEntry,
    Items,
    Kind,
    Message,
    NodeStats,
    Part,
    Payload,
    Ready,
    Release,
    Result,
    ResultEntry,
    Role,
    Sched,
    Status,
    StatusMsg,
    Submit,
    TaskEntry,
    Tasks,
    Welcome,
    WorkerStats,
)

# --------------------------------------------------------------------------
# Sizes and batches: one rule for every sender


_STATUSES: dict[int, Status] = {int(s): s for s in Status}


def payload_bytes(payload: Payload) -> int:
    """Bytes of a payload (zmq Frames, bytes and 1-D byte views: ``len`` is bytes)."""
    if len(payload) == 1:  # the common case: one pickle, no buffers
        return len(payload[0])
    return sum(len(f) for f in payload)


def _wire_frames(payload: Payload) -> int:
    """Frames a payload takes beside the header (0 when it rides inline)."""
    n = len(payload)
    return 0 if n == 1 and len(payload[0]) <= INLINE_MAX else n


E = TypeVar("E", TaskEntry, ResultEntry, ItemEntry)


def batches(entries: Sequence[E], max_entries: int = BATCH_MAX_TASKS, max_bytes: int = BATCH_MAX_BYTES,
            reserved_frames: int = 0) -> Iterator[Sequence[E]]:
    """``entries`` in runs that each fit one message: at least one entry, then up to
    ``max_entries`` entries, about ``max_bytes`` of payload and MAX_FRAMES frames
    (``reserved_frames`` of those kept for function blobs)."""
    start, total = 0, len(entries)
    if total <= max_entries and total and _fits(entries, max_bytes, MAX_FRAMES - reserved_frames):
        yield entries  # the common case: a small batch, checked in one pass
        return
    while start < total:
        end = start
        nbytes = nframes = 0
        limit = MAX_FRAMES - reserved_frames
        while end < total:
            payload = entries[end].payload
            frames = _wire_frames(payload)
            if end > start and (end - start >= max_entries or nbytes >= max_bytes or nframes + frames > limit):
                break
            nbytes += payload_bytes(payload)
            nframes += frames
            end += 1
        yield entries[start:end]
        start = end


def chunks(ids: Sequence[Any], size: int = MAX_ENTRIES) -> Iterator[tuple[Any, ...]]:
    """``ids`` (task ids, digests) in tuples of at most ``size``: the most one message may list."""
    for i in range(0, len(ids), size):
        yield tuple(ids[i:i + size])


def runs(entries: Iterable[E]) -> Iterator[tuple[int, Iterator[E]]]:
    """``(task id, its entries)`` for each run of one task's entries in ``entries`` (a worker sends a task's
    stream items together: each run is routed with one lookup, and delivered under one lock)."""
    return itertools.groupby(entries, _TASK_ID)


_TASK_ID = operator.itemgetter(0)  # every entry's first field


def _fits(entries: Sequence[E], max_bytes: int, max_frames: int) -> bool:
    nbytes = nframes = 0
    for entry in entries:
        payload = entry.payload
        nbytes += payload_bytes(payload)
        nframes += _wire_frames(payload)
    return nbytes < max_bytes + payload_bytes(entries[-1].payload) and nframes <= max_frames


# --------------------------------------------------------------------------
# Encoding


def _place(payload: Payload, frames: list[Frame]) -> tuple[int, bytes]:
    """``(nframes, data)`` for an entry's row; its frames (if not inline) appended to ``frames``."""
    if len(payload) == 1:
        head = payload[0]
        if len(head) <= INLINE_MAX:
            if type(head) is bytes:
                return 0, head
            return 0, head.bytes if isinstance(head, zmq.Frame) else bytes(head)
    frames.extend(payload)
    return len(payload), b""


def encode(msg: Message) -> list[Frame]:
    """The frames of ``msg``: its header, then its payload frames in wire order."""
    frames: list[Frame] = [b""]
    h: dict[str, Any] = {"v": VERSION, "k": int(msg.kind)}
    match msg:
        case Submit(tasks=tasks, funcs=funcs) | Tasks(tasks=tasks, funcs=funcs):
            h["f"] = [f.digest for f in funcs]
            if any(f.name for f in funcs):
                h["fn"] = [f.name for f in funcs]
            frames.extend(f.blob for f in funcs)
            rows: list[tuple[Any, ...]] = []
            for t in tasks:
                nframes, data = _place(t.payload, frames)
                if t.sched is not None:
                    rows.append((t.id, t.digest, nframes, t.flags, data, t.retries, t.timeout_ms, t.refs,
                                 t.parts, t.part_bytes, _sched_row(t.sched)))
                elif t.parts:
                    rows.append((t.id, t.digest, nframes, t.flags, data, t.retries, t.timeout_ms, t.refs,
                                 t.parts, t.part_bytes))
                elif t.refs:
                    rows.append((t.id, t.digest, nframes, t.flags, data, t.retries, t.timeout_ms, t.refs))
                else:
                    rows.append((t.id, t.digest, nframes, t.flags, data, t.retries, t.timeout_ms))
            h["t"] = rows
        case Result(results=results, agent=agent, epoch=epoch):
            rows_r: list[tuple[Any, ...]] = []
            for r in results:
                nframes, data = _place(r.payload, frames) if r.payload else (0, b"")
                if r.worker or r.error:
                    rows_r.append((r.id, int(r.status), nframes, r.duration_us, data, r.cause, r.worker, r.error))
                else:
                    rows_r.append((r.id, int(r.status), nframes, r.duration_us, data, r.cause))
            h["r"] = rows_r
            if agent:
                h["a"] = agent
            if epoch:
                h["e"] = epoch
        case Items(items=items, credits=credits, agent=agent, epoch=epoch):
            h["i"] = _item_rows(items, frames)
            h["c"] = credits
            if agent:
                h["a"] = agent
            if epoch:
                h["e"] = epoch
        case Feed(items=items, credits=credits, closed=closed):
            h["i"] = _item_rows(items, frames)
            h["c"] = credits
            h["closed"] = closed
        case Hello(role=role, name=name, host=host, pid=pid, workers=workers, resources=resources):
            h.update(role=role.value, name=name, host=host, pid=pid, workers=workers)
            if resources:
                h["res"] = dict(resources)
        case Welcome(epoch=epoch, heartbeat=heartbeat, liveness=liveness, collector=collector,
                     max_message_size=max_message_size):
            h.update(epoch=epoch, heartbeat=heartbeat, liveness=liveness, collector=collector,
                     max_message_size=max_message_size)
        case Ready(credits=n):
            h["n"] = n
        case Heartbeat(busy=busy, stats=stats):
            h["busy"] = busy
            if stats is not None:
                h["s"] = stats
        case Cancel(ids=ids, force=force):
            h["ids"] = ids
            h["force"] = force
        case StatusMsg(info=info):
            h["info"] = info
        case Bye(reason=reason, agent=agent):
            h["reason"] = int(reason)
            if agent:
                h["a"] = agent
        case Ack(ids=ids) | GiveBack(ids=ids):
            h["ids"] = ids
        case Release(digests=digests):
            h["d"] = digests
        case Control(action=action, workers=workers):
            h.update(action=action.value, workers=workers)
        case Part(id=tid, seq=seq, payload=payload):
            h.update(id=tid, seq=seq, n=len(payload))
            frames.extend(payload)
        case Error(code=code, ids=ids, detail=detail):
            h["code"] = int(code)
            h["ids"] = ids
            h["detail"] = detail
    frames[0] = _packer().pack(h)
    return frames


_local = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's msgpack Packer, kept: ``packb`` makes one per call, with a 256 KiB buffer that a
    daemon's malloc once served by mmap and munmap (zpar._loop.tune_malloc): 10.5 us a header, 1.6 kept."""
    packer: msgpack.Packer | None = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _item_rows(items: tuple[ItemEntry, ...], frames: list[Frame]) -> list[tuple[int, int, int, bytes]]:
    rows = []
    for i in items:
        nframes, data = _place(i.payload, frames)
        rows.append((i.id, i.seq, nframes, data))
    return rows


def encode_routed(peer: bytes, msg: Message) -> list[Frame]:
    """The frames of ``msg`` behind a ROUTER's routing id for ``peer``."""
    frames = encode(msg)
    frames.insert(0, peer)
    return frames


# --------------------------------------------------------------------------
# Decoding: every field checked, because the other end may be anyone.


class _Frames:
    """Hands out the payload frames of a message, in order, as its header declares them."""

    __slots__ = ("frames", "pos")

    def __init__(self, frames: Sequence[Frame], pos: int) -> None:
        self.frames, self.pos = frames, pos

    def take(self, nframes: int, data: bytes, what: str) -> Payload:
        if nframes == 0:
            if not data:
                raise ProtocolError(f"{what} needs its payload, inline or in frames")
            return (data,)
        if data:
            raise ProtocolError(f"{what} has both inline data and frames")
        start = self.pos
        self.pos += nframes
        if self.pos > len(self.frames):
            raise ProtocolError(f"{what} declares more frames than came")
        return self.frames[start:self.pos]


def _get(h: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in h:
        if default is ...:
            raise ProtocolError(f"header field {key!r} is missing")
        return default
    value = h[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise ProtocolError(f"header field {key!r} has type {type(value).__name__}")
    return value


def _nonneg_int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ProtocolError(f"{what} must be a non-negative integer")
    return value


def _rows(h: dict[str, Any], key: str, default: Any = ...) -> list[Any]:
    rows: list[Any] = _get(h, key, list, default)
    if len(rows) > MAX_ENTRIES:
        raise ProtocolError(f"{len(rows)} entries in {key!r} is over the {MAX_ENTRIES} limit")
    return rows


def _ids(h: dict[str, Any], key: str, default: Any = ...) -> tuple[int, ...]:
    return tuple(_nonneg_int(i, "task id") for i in _rows(h, key, default))


def _tasks(h: dict[str, Any], fr: _Frames) -> tuple[tuple[TaskEntry, ...], tuple[Function, ...]]:
    rows = _rows(h, "t")
    digests = _rows(h, "f", [])
    for d in digests:
        if type(d) is not bytes:
            raise ProtocolError("function digests must be bytes")
    if fr.pos + len(digests) > len(fr.frames):
        raise ProtocolError("fewer frames than function blobs")
    names = _rows(h, "fn") if "fn" in h else None
    if names is not None and (len(names) != len(digests) or any(type(n) is not str or len(n) > MAX_NAME
                                                                for n in names)):
        raise ProtocolError(f"function names must be one string of at most {MAX_NAME} characters per function")
    funcs = tuple(Function(d, fr.frames[fr.pos + i], names[i] if names else "") for i, d in enumerate(digests))
    fr.pos += len(digests)
    out = []
    for row in rows:
        refs: tuple[bytes, ...] = ()
        parts = part_bytes = 0
        sched = None
        if type(row) is list and len(row) == 11:
            sched = _sched(row.pop())
            if row[-2:] == [0, 0]:  # no parts
                row[-2:] = []
                if row[-1] == []:
                    row.pop()
        if type(row) is list and len(row) == 10:
            parts, part_bytes = row.pop(-2), row.pop()
            if type(parts) is not int or not 0 < parts < MAX_TASK_FRAMES or type(part_bytes) is not int \
                    or not parts <= part_bytes <= MAX_MESSAGE_SIZE:
                raise ProtocolError(f"a task's parts must be 1 to {MAX_TASK_FRAMES - 1} messages of "
                                    f"{MAX_MESSAGE_SIZE} bytes in all at most")
            if row[-1] == []:
                row.pop()
        if type(row) is list and len(row) == 8:
            refs = _digests(row.pop(), MAX_REFS + MAX_DEPS, "a task's object references")
        if sched is not None and sched.values > len(refs):
            raise ProtocolError("a task names more dependency values than object references")
        if type(row) is not list or len(row) != 7:
            raise ProtocolError("a task entry must be [id, digest, nframes, flags, data, retries, timeout_ms],"
                                " then its objects' digests if it refers to any, then its parts and their bytes"
                                " if it has any, then its scheduling if it has any")
        tid, digest, nframes, flags, data, retries, timeout_ms = row
        if (type(tid) is not int or tid < 0 or type(digest) is not bytes or type(nframes) is not int
                or nframes < 0 or type(flags) is not int or flags < 0 or type(data) is not bytes
                or type(retries) is not int or not 0 <= retries <= MAX_RETRIES
                or type(timeout_ms) is not int or timeout_ms < 0):
            raise ProtocolError(f"malformed task entry {row!r:.200}")
        payload = (data,) if nframes == 0 and data else fr.take(nframes, data, "a task")
        out.append(TaskEntry(tid, digest, payload, flags, retries, timeout_ms, refs, parts, part_bytes, sched))
    return tuple(out), funcs


def _sched_row(s: Sched) -> tuple[Any, ...]:
    return (s.priority, dict(s.resources), s.resource_timeout_ms, s.deps, s.values)


def _sched(value: Any) -> Sched:
    """A task's ``Sched`` from its wire row, checked: every peer may be hostile."""
    if type(value) is not list or len(value) != 5:
        raise ProtocolError("a task's scheduling must be [priority, {resource: amount}, resource_timeout_ms, deps, "
                            "values]")
    priority, resources, timeout_ms, deps, values = value
    if type(priority) is not int or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ProtocolError(f"a task's priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}")
    asked = _resources(resources, "a task's")
    if type(timeout_ms) is not int or timeout_ms < 0:
        raise ProtocolError("a task's resource timeout must be a non-negative integer of milliseconds")
    if type(deps) is not list or len(deps) > MAX_DEPS or any(type(d) is not int or d < 0 for d in deps):
        raise ProtocolError(f"a task's dependencies must be a list of at most {MAX_DEPS} task ids")
    if type(values) is not int or not 0 <= values <= MAX_DEPS:
        raise ProtocolError(f"a task's dependency values must be a count from 0 to {MAX_DEPS}")
    return Sched(priority, asked, timeout_ms, tuple(deps), values)


def _resources(value: Any, whose: str) -> tuple[tuple[str, float], ...]:
    """A task's or an agent's resources (``{name: amount}``), checked, as pairs with their names sorted."""
    if type(value) is not dict or len(value) > MAX_RESOURCES:
        raise ProtocolError(f"{whose} resources must be a map of at most {MAX_RESOURCES} names to amounts")
    for name, amount in value.items():
        check_resource(name, amount, whose)
    return tuple(sorted(value.items()))


def check_resource(name: Any, amount: Any, whose: str) -> None:
    """Raise ProtocolError unless ``name: amount`` is a resource (a short printable name, a finite amount >= 0)."""
    if type(name) is not str or not 0 < len(name) <= MAX_RESOURCE_NAME or not name.isprintable():
        raise ProtocolError(f"{whose} resource names must be printable strings of 1 to {MAX_RESOURCE_NAME} "
                            "characters")
    if type(amount) not in (int, float) or not 0 <= amount < float("inf"):
        raise ProtocolError(f"{whose} resource {name!r} must be a finite amount of at least 0")


def _digests(value: Any, most: int, what: str) -> tuple[bytes, ...]:
    """A list of 1 to ``most`` digests (bytes, as a function's digest: a wrong one names nothing held)."""
    if type(value) is not list or not 0 < len(value) <= most:
        raise ProtocolError(f"{what} must be a list of 1 to {most} digests")
    for d in value:
        if type(d) is not bytes:
            raise ProtocolError(f"{what} must be digests (bytes)")
    return tuple(value)


def _number(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not 0 <= value < 1e18:
        raise ProtocolError(f"{what} must be a non-negative number")
    return float(value)


def _stats(row: Any) -> NodeStats:
    if type(row) is not list or len(row) != 4 or type(row[3]) is not list or len(row[3]) > MAX_WORKERS:
        raise ProtocolError("node stats must be [cpu, mem_used, mem_total, [[pid, rss, cpu], ...]]")
    workers = []
    for w in row[3]:
        if type(w) is not list or len(w) != 3:
            raise ProtocolError("a worker's stats must be [pid, rss, cpu]")
        workers.append(WorkerStats(_nonneg_int(w[0], "pid"), _nonneg_int(w[1], "rss"), _number(w[2], "cpu")))
    return NodeStats(_number(row[0], "cpu"), _nonneg_int(row[1], "memory"), _nonneg_int(row[2], "memory"),
                     tuple(workers))


def _cause(row: Any) -> Cause:
    if type(row) is not list or len(row) != 6:
        raise ProtocolError("a cause must be [node, pid, exitcode, signal, attempts, detail]")
    node, pid, exitcode, sig, attempts, detail = row
    if (type(node) is not str or type(pid) is not int or pid < 0 or type(attempts) is not int or attempts < 0
            or type(detail) is not str or not (exitcode is None or type(exitcode) is int)
            or not (sig is None or (type(sig) is int and sig > 0))):
        raise ProtocolError(f"malformed cause {row!r:.200}")
    return Cause(node, pid, exitcode, sig, attempts, detail)


def _results(h: dict[str, Any], fr: _Frames) -> tuple[ResultEntry, ...]:
    out = []
    for row in _rows(h, "r"):
        worker, error = 0, ""
        if type(row) is list and len(row) == 8:
            worker, error = row.pop(-2), row.pop()
            if type(worker) is not int or worker < 0 or type(error) is not str or len(error) > MAX_ERROR_TEXT:
                raise ProtocolError(f"a result's worker must be a pid and its error text of at most "
                                    f"{MAX_ERROR_TEXT} characters")
        if type(row) is not list or len(row) != 6:
            raise ProtocolError("a result entry must be [id, status, nframes, duration_us, data, cause], then "
                                "[worker, error] if it has them")
        rid, status, nframes, dur, data, cause = row
        if (type(rid) is not int or rid < 0 or type(status) is not int or type(nframes) is not int
                or nframes < 0 or type(dur) is not int or dur < 0 or type(data) is not bytes):
            raise ProtocolError(f"malformed result entry {row!r:.200}")
        st = _STATUSES.get(status)  # a dict, not Status(): this runs for every result on every hop
        if st is None:
            raise ProtocolError(f"unknown result status {status!r}")
        if st in VALUE_STATUSES:
            if cause is not None:
                raise ProtocolError(f"a {st.name} result carries a value, not a cause")
            payload = (data,) if nframes == 0 and data else fr.take(nframes, data, "a result")
            out.append(ResultEntry(rid, st, payload, dur, None, worker, error))
        else:
            if nframes or data:
                raise ProtocolError(f"a {st.name} result carries a cause, not a value")
            out.append(ResultEntry(rid, st, (), dur, _cause(cause), worker, error))
    return tuple(out)


def _items(h: dict[str, Any], fr: _Frames) -> tuple[tuple[ItemEntry, ...], tuple[Credit, ...]]:
    out = []
    for row in _rows(h, "i"):
        if type(row) is not list or len(row) != 4:
            raise ProtocolError("an item entry must be [id, seq, nframes, data]")
        iid, seq, nframes, data = row
        if (type(iid) is not int or iid < 0 or type(seq) is not int or seq < 0 or type(nframes) is not int
                or nframes < 0 or type(data) is not bytes):
            raise ProtocolError(f"malformed item entry {row!r:.200}")
        out.append(ItemEntry(iid, seq, (data,) if nframes == 0 and data else fr.take(nframes, data, "an item")))
    credits = []
    for row in _rows(h, "c", []):
        if type(row) is not list or len(row) != 2:
            raise ProtocolError("a credit entry must be [id, upto]")
        credits.append(Credit(_nonneg_int(row[0], "task id"), _nonneg_int(row[1], "credit")))
    return tuple(out), tuple(credits)


def _enum(cls: type[enum.IntEnum], value: Any, what: str) -> Any:
    # The members by value, not cls(value): a quarter of the cost, on every message of every hop.
    member = cls._value2member_map_.get(_nonneg_int(value, what))
    if member is None:
        raise ProtocolError(f"unknown {what} {value!r}")
    return member


#: What one header may declare, from the protocol's own limits: a declared length past these is
#: refused before anything is allocated. Inline data is at most INLINE_MAX; an array is a list of
#: at most MAX_ENTRIES entries (or a row of a few fields); maps are the header and a status's.
_MAX_BIN, _MAX_STR, _MAX_ARRAY, _MAX_MAP = INLINE_MAX, MAX_HEADER_BYTES // 8, MAX_ENTRIES, 1024
#: Most arrays and maps in one header: a row per entry, a cause or credit per entry, and room for
#: the fields and a status's nodes. Each costs ~60 bytes here for one byte on the wire, so a
#: header of millions of empty ones is refused after these instead of allocating hundreds of MB.
MAX_CONTAINERS = 3 * MAX_ENTRIES
_UNCOUNTED_BYTES = 128 * 1024  # holds at most this many (~8 MB): not counted, so tiny tasks pay no call per row


class _Containers:
    """Counts the arrays and maps msgpack builds for one header; raises past MAX_CONTAINERS."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS

    def took(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ProtocolError(f"header holds more than {MAX_CONTAINERS} arrays and maps")
        return obj


def decode(frames: Sequence[Frame], start: int = 0) -> Message:
    """The message in ``frames[start:]``: header, then payload frames.

    Raises ProtocolError for anything but a well-formed message of this version
    whose frame count matches what its header declares.
    """
    if len(frames) <= start:
        raise ProtocolError("an empty message")
    if len(frames) - start - 1 > MAX_FRAMES:
        raise ProtocolError(f"{len(frames) - start - 1} frames is over the {MAX_FRAMES} limit")
    head = frames[start]
    header = head.buffer if isinstance(head, zmq.Frame) else head
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes is over the {MAX_HEADER_BYTES} limit")
    hook = _Containers().took if len(header) > _UNCOUNTED_BYTES else None
    try:
        h = msgpack.unpackb(header, raw=False, strict_map_key=True, use_list=True, list_hook=hook,
                            object_hook=hook, max_bin_len=_MAX_BIN, max_str_len=_MAX_STR,
                            max_array_len=_MAX_ARRAY, max_map_len=_MAX_MAP, max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types; each is a bad frame
        raise ProtocolError(f"header is not valid msgpack, or over the protocol's limits: {exc}") from None
    if type(h) is not dict:
        raise ProtocolError("header is not a map")
    v = h.get("v")
    if v != VERSION or type(v) is not int:
        raise ProtocolError(f"protocol version {v!r} is not {VERSION}; upgrade the older side")
    k: Kind = _enum(Kind, _get(h, "k", int), "message kind")
    fr = _Frames(frames, start + 1)
    msg: Message
    if k is Kind.SUBMIT or k is Kind.TASKS:
        tasks, funcs = _tasks(h, fr)
        msg = Submit(tasks, funcs) if k is Kind.SUBMIT else Tasks(tasks, funcs)
    elif k is Kind.RESULT:
        msg = Result(_results(h, fr), _get(h, "a", bytes, b""), _get(h, "e", str, ""))
    elif k is Kind.ITEMS:
        items, credits = _items(h, fr)
        msg = Items(items, credits, _get(h, "a", bytes, b""), _get(h, "e", str, ""))
    elif k is Kind.FEED:
        items, credits = _items(h, fr)
        msg = Feed(items, credits, _ids(h, "closed", []))
    elif k is Kind.HELLO:
        try:
            role = Role(_get(h, "role", str))
        except ValueError:
            raise ProtocolError(f"unknown role {h.get('role')!r}") from None
        msg = Hello(role, _get(h, "name", str, ""), _get(h, "host", str, ""),
                    _nonneg_int(_get(h, "pid", int, 0), "pid"), _nonneg_int(_get(h, "workers", int, 0), "workers"),
                    _resources(h["res"], "an agent's") if "res" in h else ())
    elif k is Kind.WELCOME:
        msg = Welcome(_get(h, "epoch", str), float(_get(h, "heartbeat", (int, float))),
                      _nonneg_int(_get(h, "liveness", int), "liveness"), _get(h, "collector", str, ""),
                      _nonneg_int(_get(h, "max_message_size", int, 0), "max_message_size"))
    elif k is Kind.READY:
        msg = Ready(_nonneg_int(_get(h, "n", int), "credits"))
    elif k is Kind.HEARTBEAT:
        msg = Heartbeat(_nonneg_int(_get(h, "busy", int, 0), "busy"), _stats(h["s"]) if "s" in h else None)
    elif k is Kind.CANCEL:
        msg = Cancel(_ids(h, "ids"), _get(h, "force", bool, False))
    elif k is Kind.STATUS:
        msg = StatusMsg(_get(h, "info", dict, {}))
    elif k is Kind.BYE:
        msg = Bye(_enum(ByeReason, _get(h, "reason", int, 0), "goodbye reason"), _get(h, "a", bytes, b""))
    elif k is Kind.ACK:
        msg = Ack(_ids(h, "ids"))
    elif k is Kind.GIVE_BACK:
        msg = GiveBack(_ids(h, "ids"))
    elif k is Kind.RELEASE:
        msg = Release(_digests(_get(h, "d", list), MAX_ENTRIES, "RELEASE"))
    elif k is Kind.CONTROL:
        try:
            action = Action(_get(h, "action", str))
        except ValueError:
            raise ProtocolError(f"unknown control action {h.get('action')!r}") from None
        workers = _nonneg_int(_get(h, "workers", int, 0), "workers")
        if workers > MAX_WORKERS or (action is Action.WORKERS and workers < 1):
            raise ProtocolError(f"a node keeps 1 to {MAX_WORKERS} workers, not {workers}")
        msg = Control(action, workers)
    elif k is Kind.PART:
        nframes = _nonneg_int(_get(h, "n", int), "a part's frame count")
        if not 0 < nframes < MAX_TASK_FRAMES:
            raise ProtocolError(f"a part must have 1 to {MAX_TASK_FRAMES - 1} frames")
        msg = Part(_nonneg_int(_get(h, "id", int), "task id"), _nonneg_int(_get(h, "seq", int), "part number"),
                   fr.take(nframes, b"", "a part"))
    else:  # Kind.ERROR
        msg = Error(_enum(ErrorCode, _get(h, "code", int), "error code"), _ids(h, "ids", []),
                    _get(h, "detail", str, ""))
    if fr.pos != len(frames):
        raise ProtocolError(f"{k.name} declares {fr.pos - start - 1} payload frames but "
                            f"{len(frames) - start - 1} came")
    return msg


def decode_routed(frames: Sequence[Frame]) -> tuple[bytes, Message]:
    """``(peer, message)`` from what a ROUTER received: the routing id, then the message."""
    if not frames:
        raise ProtocolError("an empty message")
    peer = frames[0]
    if isinstance(peer, zmq.Frame):
        return peer.bytes, decode(frames, 1)
    return bytes(peer), decode(frames, 1)
