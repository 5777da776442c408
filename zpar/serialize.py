"""Pickling for the wire: functions by digest, values as pickle-5 frames.

A value becomes a list of frames: the pickle stream, then each large buffer
(NumPy arrays, bytearrays, PickleBuffers) out of band in a frame of its own,
so ZeroMQ sends it without copying. Plain ``pickle`` is tried first because it
is fast; cloudpickle takes over for lambdas, closures and ``__main__`` code.
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import traceback
from typing import Any, Callable, Sequence

import cloudpickle

from .errors import RemoteTraceback, SerializationError, TaskError

#: Buffers at least this large travel out of band, in their own frame.
OOB_THRESHOLD = 64 * 1024
PROTOCOL = 5


def digest(blob: bytes) -> bytes:
    """The name a function blob is cached under on every hop."""
    return hashlib.blake2b(blob, digest_size=16).digest()


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


def _lift(obj: Any, depth: int = 2) -> Any:
    """``obj`` with large bytes wrapped, looking into tuples, lists and dicts ``depth`` levels down."""
    t = type(obj)
    if t is bytes:
        return _LargeBytes(obj) if len(obj) >= OOB_THRESHOLD else obj
    if depth and (t is tuple or t is list):
        lifted = [_lift(x, depth - 1) for x in obj]
        if any(a is not b for a, b in zip(lifted, obj)):
            return t(lifted)
    elif depth and t is dict:
        lifted_d = {k: _lift(v, depth - 1) for k, v in obj.items()}
        if any(lifted_d[k] is not v for k, v in obj.items()):
            return lifted_d
    return obj


#: What a value is, for error messages: a string, or a function making one only when needed.
Label = str | Callable[[], str]


def _label(what: Label) -> str:
    return what if isinstance(what, str) else what()


def dumps(obj: Any, what: Label = "value") -> list[Any]:
    """``obj`` as frames: ``[pickle, buffer, ...]``. Raises SerializationError naming it."""
    frames = _dumps(obj, what)
    if len(frames[0]) >= OOB_THRESHOLD:  # only a large stream can hold large bytes
        lifted = _lift(obj)
        if lifted is not obj:
            frames = _dumps(lifted, what)
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
        if b"__main__" in head:  # by reference to the producer's script: workers cannot import it
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        buffers.clear()
        try:
            head = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep_large)
        except Exception as exc:
            raise SerializationError(f"cannot pickle the {_label(what)} {_describe(obj)}: {exc}") from exc
    return [head, *buffers]


def loads(frames: Sequence[Any], what: Label = "value") -> Any:
    """The object ``dumps`` made; zmq Frames are read in place, without copies."""
    try:
        views = [f.buffer if hasattr(f, "buffer") else f for f in frames]
        return pickle.loads(views[0], buffers=views[1:])
    except Exception as exc:
        raise SerializationError(f"cannot unpickle the {_label(what)}: {type(exc).__name__}: {exc}") from exc


def dump_function(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
    """``(digest, blob)`` for a callable; cloudpickle ships ``__main__`` code by value."""
    if not callable(fn):
        raise TypeError(f"{_describe(fn)} is not callable")
    try:
        blob = cloudpickle.dumps(fn, protocol=PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot pickle the function {_describe(fn)}: {exc}") from exc
    return digest(blob), blob


class FunctionCache:
    """Pickles each function once per client (by identity, most recent kept).

    The cache holds the function itself, so its ``id`` cannot be reused by
    another object while it is cached.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: collections.OrderedDict[int, tuple[Any, bytes, bytes]] = collections.OrderedDict()

    def get(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        key = id(fn)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is fn:
            self._entries.move_to_end(key)
            return hit[1], hit[2]
        d, blob = dump_function(fn)
        self._entries[key] = (fn, d, blob)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return d, blob


# --------------------------------------------------------------------------
# Exceptions raised by tasks


def dump_exception(exc: BaseException, host: str, pid: int) -> list[Any]:
    """Frames for an exception raised in a task, with its traceback text.

    The original exception travels when it survives a pickle round trip here;
    otherwise a TaskError carrying its type name and text takes its place.
    """
    tb = "".join(traceback.format_exception(exc))
    try:
        frames = dumps((exc, tb, host, pid), what="exception")
        pickle.loads(frames[0], buffers=frames[1:])  # some pickle but do not unpickle
        return frames
    except Exception:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        stand_in = TaskError(f"{name}: {exc}", name, tb)
        return dumps((stand_in, tb, host, pid), what="exception")


def load_exception(frames: Sequence[Any]) -> BaseException:
    """The exception a task raised, with ``remote_traceback``, ``host`` and ``pid`` set."""
    exc, tb, host, pid = loads(frames, what="exception")
    exc.__cause__ = RemoteTraceback(tb)
    for name, value in (("remote_traceback", tb), ("host", host), ("pid", pid)):
        try:
            setattr(exc, name, value)
        except Exception:  # some exception types refuse new attributes
            pass
    return exc
