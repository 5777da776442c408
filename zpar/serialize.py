"""Pickling for the wire: functions by digest, values as pickle-5 frames.

A value becomes a list of frames: the pickle stream, then each large buffer
(NumPy arrays, bytearrays, PickleBuffers) out of band in a frame of its own,
so ZeroMQ sends it without copying. Plain ``pickle`` is tried first because it
is fast; cloudpickle takes over for lambdas, closures and ``__main__`` code.
"""

from __future__ import annotations

import collections
import functools
import io
import mmap
import pickle
import struct
import threading
import traceback
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import cloudpickle

from . import _shm, _source
from . import protocol as P
from .errors import PayloadTooLarge, RemoteTraceback, SerializationError, TaskError

#: Buffers at least this large travel out of band, in their own frame.
OOB_THRESHOLD = 64 * 1024
PROTOCOL = 5

#: With ``chunk=True`` (a CurveZMQ link ahead), buffers over twice this size travel in frames
#: of this size (more for a huge buffer: at most _MAX_CHUNKS frames in all), so that each hop
#: works frame by frame: the sender encrypts one while the receiver decrypts the one before
#: (a 64 MB array crosses a CurveZMQ hop at ~650 MB/s instead of ~300 here). Without
#: encryption the receiver's copy to join them costs more than it saves.
CHUNK_BYTES = 1 << 20
_MAX_CHUNKS = 2000
#: A chunked value's first frame: this, the chunk count of each buffer (uint32 each,
#: little-endian, behind a uint32 count), then the pickle stream.
_CHUNKED = b"\x00zpar-chunks\x00"
#: A value whose large buffers are in a shared-memory segment (zpar._shm; one host only): its first
#: frame is this, a flags byte (1: the receiver removes the segment once mapped), the segment's path
#: (uint16 length, then UTF-8), the buffer count (uint32), and per buffer its offset and size in the
#: segment (uint64 each; offset _IN_FRAME: the buffer is the next frame instead), then the pickle stream.
_SHARED = b"\x00zpar-shm\x00"
_IN_FRAME = (1 << 64) - 1
_HANDOFF = 1


def _describe(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:197] + "..."


class _LargeBytes:
    """Stands in for a large ``bytes`` so that it travels out of band.

    Pickle writes ``bytes`` into its stream (a copy) before any hook can see
    them, so ``dumps`` swaps large ones for this wrapper near the top of the
    value; the receiver gets a plain ``bytes`` again.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (pickle.PickleBuffer(self.data),)


#: A container is searched for large bytes only if the stream holds this many bytes per item in
#: it: the search then costs little next to the pickling, and a long list of small things (a
#: chunk of map results) is not searched at all.
_LIFT_BYTES_PER_ITEM = 512


def _lift(obj: Any, depth: int = 2, max_items: int = 1 << 62) -> Any:
    """``obj`` with large bytes wrapped, looking into tuples, lists and dicts of at most
    ``max_items`` items, ``depth`` levels down."""
    t = type(obj)
    if t is bytes:
        return _LargeBytes(obj) if len(obj) >= OOB_THRESHOLD else obj
    if depth and (t is tuple or t is list) and len(obj) <= max_items:
        lifted = [_lift(x, depth - 1, max_items) for x in obj]
        if any(a is not b for a, b in zip(lifted, obj, strict=True)):
            return t(lifted)
    elif depth and t is dict and len(obj) <= max_items:
        lifted_d = {k: _lift(v, depth - 1, max_items) for k, v in obj.items()}
        if any(lifted_d[k] is not v for k, v in obj.items()):
            return lifted_d
    return obj


#: What a value is, for error messages: a string, or a function making one only when needed.
Label = str | Callable[[], str]


def _label(what: Label) -> str:
    return what if isinstance(what, str) else what()


#: Types pickled in band by plain pickle whatever their value (str and bytes may be large: not these).
_PLAIN = frozenset({int, float, bool, complex, type(None)})


def dumps(obj: Any, what: Label = "value", chunk: bool = False, shared: _shm.Space | None = None) -> list[Any]:
    """``obj`` as frames: ``[pickle, buffer, ...]``. Raises SerializationError naming it.

    ``chunk``: split large buffers into CHUNK_BYTES frames (for encrypted links).
    ``shared``: put buffers of _shm.THRESHOLD bytes or more in a shared-memory
    segment there (the receiver is on this host), sending only where they are.
    """
    if type(obj) in _PLAIN:  # no buffer, no reference to any module: plain pickle (a stream's items)
        return [pickle.dumps(obj, protocol=PROTOCOL)]
    frames = _dumps(obj, what)
    if len(frames[0]) >= OOB_THRESHOLD:  # only a large stream can hold large bytes
        lifted = _lift(obj, 2, len(frames[0]) // _LIFT_BYTES_PER_ITEM)
        if lifted is not obj:
            frames = _dumps(lifted, what)
    if shared is not None and len(frames) > 1:
        placed = _placed(frames, shared)
        if placed is not None:
            return placed
    if chunk and len(frames) > 1 and max(memoryview(b).nbytes for b in frames[1:]) >= 2 * CHUNK_BYTES:
        return _chunked(frames[0], frames[1:])
    return frames


def _dumps(obj: Any, what: Label) -> list[Any]:
    buffers: list[memoryview] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True  # in band: cheaper than a frame of its own
        buffers.append(raw)
        return False

    try:
        head = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep_large)
        if b"__main__" in head or (_BY_VALUE and _names_by_value_module(head)):
            # by reference to the producer's script, or to a module the user asked cloudpickle to
            # ship by value: workers may not be able to import either
            raise pickle.PicklingError("refers to __main__ or to a module pickled by value")
    except Exception:  # noqa: BLE001 - pickle fails in many types (TypeError, AttributeError...): cloudpickle's turn
        buffers.clear()
        try:
            head = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep_large)
        except Exception as exc:
            raise SerializationError(f"cannot pickle the {_label(what)} {_describe(obj)}: {exc}") from exc
    return [head, *buffers]


def _chunked(head: bytes, buffers: list[memoryview]) -> list[Any]:
    size = max(CHUNK_BYTES, -(-sum(b.nbytes for b in buffers) // _MAX_CHUNKS))
    counts: list[int] = []
    frames: list[Any] = []
    for buf in buffers:
        flat = buf.cast("B") if buf.ndim != 1 or buf.format != "B" else buf
        parts = [flat[i:i + size] for i in range(0, flat.nbytes, size)] if flat.nbytes >= 2 * size else [flat]
        counts.append(len(parts))
        frames.extend(parts)
    layout = struct.pack(f"<I{len(counts)}I", len(counts), *counts)
    return [_CHUNKED + layout + head, *frames]


def _placed(frames: list[Any], space: _shm.Space) -> list[Any] | None:
    """``frames`` with their large buffers in a segment of ``space``; None if none is large, or no segment."""
    large = [b for b in frames[1:] if b.nbytes >= _shm.THRESHOLD]
    if not large:
        return None
    put = space.put(large)
    if put is None:
        return None  # /dev/shm full or gone: the frames go as they are
    path, offsets = put
    at = iter(offsets)
    rows: list[int] = []
    rest: list[Any] = []
    for buf in frames[1:]:
        if buf.nbytes >= _shm.THRESHOLD:
            rows += (next(at), buf.nbytes)
        else:
            rows += (_IN_FRAME, 0)
            rest.append(buf)
    out = [_SHARED + _pack_layout(_HANDOFF if space.handoff else 0, path, rows) + frames[0], *rest]
    return out if space.handoff else space.own(out, path)


def _pack_layout(flags: int, path: str, rows: Sequence[int]) -> bytes:
    """A shared value's layout, after the marker (``_layout`` reads it back)."""
    name = path.encode()
    return struct.pack(f"<BH{len(name)}sI{len(rows)}Q", flags, len(name), name, len(rows) // 2, *rows)


def _shared_head(head: Any) -> bool:
    """True if ``head`` (a value's first frame) is a shared value's: its buffers in a segment (zpar._shm)."""
    return memoryview(head).nbytes > 0 and head[0] == 0 and bytes(memoryview(head)[:len(_SHARED)]) == _SHARED


def _layout(head: memoryview) -> tuple[int, str, tuple[int, ...], int]:
    """``(flags, path, rows, pickle offset)`` of a shared value's first frame, after the marker."""
    flags, size = struct.unpack_from("<BH", head)
    path = bytes(head[3:3 + size]).decode()
    (n,) = struct.unpack_from("<I", head, 3 + size)
    pos = 7 + size
    if 16 * n > head.nbytes - pos:
        raise ValueError("a shared value's layout is cut short")
    return flags, path, struct.unpack_from(f"<{2 * n}Q", head, pos), pos + 16 * n


def _attached(views: list[Any]) -> tuple[Any, list[Any]]:
    """The pickle stream and buffers of a shared value: the segment mapped, no copy."""
    flags, path, rows, start = _layout(memoryview(views[0])[len(_SHARED):])
    whole = memoryview(_shm.attach(path, handoff=bool(flags & _HANDOFF)))
    frames = iter(views[1:])
    buffers: list[Any] = []
    for i in range(0, len(rows), 2):
        offset, nbytes = rows[i], rows[i + 1]
        if offset == _IN_FRAME:
            buffers.append(next(frames))
        elif offset + nbytes > whole.nbytes:
            raise ValueError(f"a buffer lies past the end of its segment {path}")
        else:
            buffers.append(whole[offset:offset + nbytes])
    if len(buffers) != len(rows) // 2 or next(frames, None) is not None:
        raise ValueError("a shared value's frames do not match its layout")
    return memoryview(views[0])[len(_SHARED) + start:], buffers


def kept(frames: Sequence[Any]) -> tuple[list[Any], str]:
    """``frames`` of a value to keep past its receiver: one in a shared-memory segment names a second link
    to that segment (``_shm.link``: no copy; the caller removes it when done, the path returned), with no
    handoff (those who map it leave it in place); any other as it is, and "" for the path."""
    views = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    if not views or not _shared_head(views[0]):
        return views, ""
    _flags, path, rows, start = _layout(memoryview(views[0])[len(_SHARED):])
    second = _shm.link(path)
    if second is None:
        raise OSError(f"could not link the shared-memory segment {path}")
    return [_SHARED + _pack_layout(0, second, rows) + bytes(memoryview(views[0])[len(_SHARED) + start:]),
            *views[1:]], second


def discard(frames: Sequence[Any]) -> None:
    """Remove the segment of a value nobody will load (a result dropped unread), if it has one to remove."""
    try:
        head = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
        if _shared_head(head):
            flags, path, _rows, _start = _layout(memoryview(head)[len(_SHARED):])
            if flags & _HANDOFF:
                _shm.discard(path)
    except (IndexError, ValueError, struct.error, UnicodeDecodeError):
        pass  # not one of ours: nothing to remove


def _blank(nbytes: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``nbytes`` zero bytes, as arrays expect; a large one mapped in transparent huge
    pages where the kernel has them (a 64 MB array is joined in 16 ms instead of 40 here: 2 MiB pages
    fault in 512 times fewer, and nothing zeroes the buffer before the copy)."""
    if nbytes < _HUGE_FROM or _MADV_HUGEPAGE is None:
        return bytearray(nbytes)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(_MADV_HUGEPAGE)
    except OSError:  # transparent huge pages switched off: small pages, still not zeroed twice
        pass
    return buf


_HUGE_FROM = 4 << 20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def _joined(views: list[Any]) -> tuple[Any, list[Any]]:
    """The pickle stream and whole buffers of a chunked value (one copy per chunked buffer)."""
    head = memoryview(views[0])[len(_CHUNKED):]
    (n,) = struct.unpack_from("<I", head)
    counts = struct.unpack_from(f"<{n}I", head, 4)
    if sum(counts) != len(views) - 1:
        raise ValueError(f"a chunked value declares {sum(counts)} frames and has {len(views) - 1}")
    buffers: list[Any] = []
    pos = 1
    for count in counts:
        parts = views[pos:pos + count]
        pos += count
        if count == 1:
            buffers.append(parts[0])
            continue
        whole = _blank(sum(memoryview(p).nbytes for p in parts))
        offset = 0
        for part in parts:
            nbytes = memoryview(part).nbytes
            whole[offset:offset + nbytes] = part
            offset += nbytes
        buffers.append(whole)
    return head[4 + 4 * n:], buffers


def check_payload(frames: Sequence[Any], what: Label) -> None:
    """Raise PayloadTooLarge, naming ``what``, unless ``frames`` fit in one task (protocol's limits)."""
    if len(frames) > P.MAX_TASK_FRAMES:
        raise PayloadTooLarge(f"the {_label(what)} holds {len(frames) - 1} large buffers; at most "
                              f"{P.MAX_TASK_FRAMES - 1} fit in a task: use fewer, bigger arrays")
    if sum(memoryview(f).nbytes for f in frames) > P.MAX_MESSAGE_SIZE:  # one frame too: a scattered object
        raise PayloadTooLarge(f"the {_label(what)} takes over {P.MAX_MESSAGE_SIZE >> 20} MiB, the most one "
                              "task may carry: split the work, or load the data from shared storage in the task")


#: The modules registered with ``cloudpickle.register_pickle_by_value`` (cloudpickle's own set).
_BY_VALUE: set[str] = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())


def _names_by_value_module(head: bytes) -> bool:
    return any(name.encode() in head for name in _BY_VALUE)


def loads(frames: Sequence[Any], what: Label = "value", shared: bool = False) -> Any:
    """The object ``dumps`` made; zmq Frames are read in place, without copies.

    ``shared``: the frames come from this host's embedded cluster, and may name
    a shared-memory segment (zpar._shm); from anyone else such a value is refused.
    """
    try:
        views = [f.buffer if hasattr(f, "buffer") else f for f in frames]
        if views[0][0] == 0:  # a marker: a pickle stream starts with PROTO (0x80)
            marker = bytes(memoryview(views[0])[:len(_CHUNKED)])
            if marker.startswith(_SHARED):
                if not shared:
                    raise ValueError("it names a shared-memory segment, and its sender is not on this "
                                     "host's embedded cluster")
                head, buffers = _attached(views)
                return pickle.loads(head, buffers=buffers)
            if len(views) > 1 and marker == _CHUNKED:
                head, buffers = _joined(views)
                return pickle.loads(head, buffers=buffers)
        return pickle.loads(views[0], buffers=views[1:])
    except Exception as exc:
        raise SerializationError(f"cannot unpickle the {_label(what)}: {type(exc).__name__}: {exc}") from exc


def dump_function(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
    """``(digest, blob)`` for a callable; cloudpickle ships ``__main__`` code by value."""
    if not callable(fn):
        raise TypeError(f"{_describe(fn)} is not callable")
    try:
        with io.BytesIO() as buf:  # code shipped by value carries its file name and lines (zpar._source)
            _source.dump(fn, buf, PROTOCOL)
            blob = buf.getvalue()
    except Exception as exc:
        raise SerializationError(f"cannot pickle the function {_describe(fn)}: {exc}") from exc
    return P.digest(blob), blob  # the name every hop caches it under, and verifies


class FunctionCache:
    """Pickles each function once per client, for as long as it lives (the ``size`` most recent kept).

    Keyed by the function's identity and held by a weak reference: the cache
    never keeps a function alive, nor what it holds (a bound method's object,
    a closure's cells), and an entry goes with its function, so no other
    object can take over its ``id``. ``owner`` and ``kind``: a wrapper that
    only adds a kind to a function it holds (``_wrappers.identity``) is cached
    under that function, so each new wrapper is no new pickle. A callable that
    takes no weak reference (``operator.itemgetter``, an object with
    ``__slots__``) is pickled at each call. Thread-safe.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        # Reentrant: a weakref callback (_forget) may run in this thread inside get(), from a collection.
        self._lock = threading.RLock()
        self._entries: collections.OrderedDict[tuple[int, Hashable], _Cached] = collections.OrderedDict()

    def get(self, fn: Callable[..., Any], owner: Any = None, kind: Hashable = ()) -> tuple[bytes, bytes]:
        """``(digest, blob)`` of ``fn``; ``owner`` (default ``fn``) is what the entry lives as long as."""
        owner = fn if owner is None else owner
        key = (id(owner), kind)
        # A hit takes no lock (every submit comes here): each OrderedDict call is atomic.
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is owner:
            try:
                self._entries.move_to_end(key)
            except KeyError:
                pass  # evicted meanwhile, by another thread: still a right answer
            return hit[1], hit[2]
        d, blob = dump_function(fn)  # outside the lock: pickling runs the user's code
        try:
            ref = weakref.ref(owner, functools.partial(_forget, self._entries, self._lock, key))
        except TypeError:
            return d, blob  # takes no weak reference: holding it strongly would keep it alive
        with self._lock:
            self._entries[key] = (ref, d, blob)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return d, blob


_Cached = tuple[weakref.ref[Any], bytes, bytes]  # (the function, weakly; its digest; its blob)


def _forget(entries: collections.OrderedDict[tuple[int, Hashable], _Cached], lock: threading.RLock,
            key: tuple[int, Hashable], ref: weakref.ref[Any]) -> None:
    """A cached function died: drop its entry (unless a newer one took the key) and so its blob."""
    with lock:
        hit = entries.get(key)
        if hit is not None and hit[0] is ref:
            del entries[key]


# --------------------------------------------------------------------------
# Exceptions raised by tasks


def dump_exception(exc: BaseException, host: str, pid: int, tb: str | None = None) -> list[Any]:
    """Frames for an exception raised in a task, with its traceback text (``tb``, if the caller made it).

    The original exception travels when it survives a pickle round trip here;
    otherwise a TaskError carrying its type name and text takes its place.
    """
    if tb is None:
        tb = "".join(traceback.format_exception(exc))
    try:
        frames = dumps((exc, tb, host, pid), what="exception")
        pickle.loads(frames[0], buffers=frames[1:])  # some pickle but do not unpickle
        return frames
    except BaseException:  # noqa: BLE001 - whatever the round trip raised (SystemExit too), a stand-in travels
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        stand_in = TaskError(f"{name}: {exc}", name, tb)
        return dumps((stand_in, tb, host, pid), what="exception")


def load_exception(frames: Sequence[Any]) -> BaseException:
    """The exception a task raised, with ``remote_traceback``, ``host`` and ``pid`` set."""
    loaded: tuple[BaseException, str, str, int] = loads(frames, what="exception")  # as dump_exception made it
    exc, tb, host, pid = loaded
    exc.__cause__ = RemoteTraceback(tb)
    for name, value in (("remote_traceback", tb), ("host", host), ("pid", pid)):
        try:
            setattr(exc, name, value)
        except Exception:  # noqa: BLE001, S110 - some exception types refuse new attributes
            pass
    return exc
