"""Scattered objects: a value put once (``Client.scatter``) and used by many tasks through a ``Ref``.

A scattered value travels as one blob named by its digest, the way a function
does: the producer sends it to the broker once, the broker to each node once,
the agent to each worker once (``protocol.Shipped`` on every hop), and a task
names the blobs it uses in its entry's ``refs``. So a 100 MB array used by a
thousand tasks crosses each hop once, not a thousand times.

A ``Ref`` pickles as a call to ``_resolve(digest)``. While the client pickles
a task's arguments it notes every Ref pickled (``begin``/``taken``), at any
depth of any container or object, and the task carries their digests. In the
worker, ``_resolve`` finds the value in the worker's cache (``WorkerObjects``,
unpickled once, on first use). Elsewhere it gives back a detached Ref (one a
task returned, say): it names the value by its digest only, so a client
accepts it in a task only while that client still holds the value itself.

The blob (``pack``) is the value's pickle and its out-of-band buffers laid
end to end in one frame, each buffer aligned, so the worker maps its arrays
onto the frame it received without a copy. The values a worker hands to its
tasks are read-only (as loky's memory-mapped arrays are): every task of the
node shares them. On the embedded cluster's host, large buffers go into a
shared-memory segment instead (``zpar._shm``, as task arguments do): the blob
holds only where they are, each worker maps the segment (read-only views,
no copy), and the segment lives as long as the object (``Blob.keep``).

Lifetime: the client counts the live Refs of each digest; when the last is
collected (or ``Ref.release()``), or the client closes, it tells the broker
(RELEASE), which frees it once no task uses it, then tells the nodes.
"""

from __future__ import annotations

import pickle
import struct
import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import protocol as P

#: The first bytes of every object blob: how a worker tells an object from a function in TASKS.
MAGIC = b"\x00zpar-object\x00"
_ALIGN = 64  # buffers start on cache lines (and satisfy any dtype's alignment)
_local = threading.local()
#: True once this process has made a Ref: until then a client skips noting Refs (``begin``/``taken``), which
#: costs a few hundred nanoseconds a task.
made = False


def is_object(blob: P.Frame) -> bool:
    """True if ``blob`` is a scattered object's (not a function's)."""
    view = memoryview(blob.buffer if hasattr(blob, "buffer") else blob)
    return view.nbytes >= len(MAGIC) and view[:len(MAGIC)] == MAGIC


# ----------------------------------------------------------------- the blob


class Blob(bytes):
    """An object blob whose large buffers are in a shared-memory segment: ``keep`` (the frames that own the
    segment) goes with it, so the segment lives as long as anything holds the blob (a Ref, a pending task)."""

    keep: Any = None


def pack(obj: Any, shared: Any = None) -> bytes:
    """``obj`` as one object blob: MAGIC, the layout, then its pickle and buffers, each aligned.

    ``shared``: a ``zpar._shm.Space`` (the embedded cluster's host) for its large buffers; the result is then
    a Blob, its segment kept by it.
    """
    from . import serialize  # the worker's side of this module imports no pickler

    frames = serialize.dumps(obj, what="scattered object", shared=shared)
    joined = pack_frames(frames)  # the one copy the producer makes (no zero-filling first)
    if shared is None or type(frames) is list:
        return joined
    blob = Blob(joined)  # small: the buffers are in the segment, which ``frames`` owns
    blob.keep = frames
    return blob


def pack_frames(frames: P.Payload) -> bytes:
    """A value's frames (``serialize.dumps``'s, or a task's result payload as the broker got it) as one
    object blob: MAGIC, the layout, then each frame, aligned. No unpickling: the broker packs the value of a
    task that others take as an argument (``Sched.deps``) this way."""
    views = [memoryview(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    views = [v.cast("B") if v.ndim != 1 or v.format != "B" else v for v in views]
    spans: list[int] = []
    parts: list[Any] = [b""]  # the header, once the spans are known
    pos = len(MAGIC) + 4 + 16 * len(views)
    for view in views:
        start = -(-pos // _ALIGN) * _ALIGN
        if start > pos:
            parts.append(bytes(start - pos))
        spans += (start, view.nbytes)
        parts.append(view)
        pos = start + view.nbytes
    parts[0] = MAGIC + struct.pack(f"<I{len(spans)}Q", len(views), *spans)
    return b"".join(parts)


def unpack(blob: P.Frame, shared: bool = False) -> Any:
    """The value in an object blob; its buffers are read-only views of ``blob``, not copies.
    ``shared``: as ``serialize.loads``'s (only the embedded cluster's workers map segments)."""
    from .errors import SerializationError

    try:
        view = memoryview(blob.buffer if hasattr(blob, "buffer") else blob).toreadonly()
        (n,) = struct.unpack_from("<I", view, len(MAGIC))
        spans = struct.unpack_from(f"<{2 * n}Q", view, len(MAGIC) + 4)
        parts = [view[spans[i]:spans[i] + spans[i + 1]] for i in range(0, 2 * n, 2)]
        if parts[0][0] == 0:  # serialize's marker: buffers in chunks, or in shared memory (zpar._shm)
            from .serialize import _CHUNKED, _attached, _joined

            if bytes(parts[0][:len(_CHUNKED)]) == _CHUNKED:  # a task's value, from a CurveZMQ link (pack_frames)
                head, buffers = _joined(parts)
                return pickle.loads(head, buffers=[memoryview(b).toreadonly() for b in buffers])
            if not shared:
                raise ValueError("it names a shared-memory segment, and this worker is not on its producer's "
                                 "embedded cluster")
            head, buffers = _attached(parts)  # the segment mapped copy-on-write; read-only here, as frames are
            return pickle.loads(head, buffers=[memoryview(b).toreadonly() for b in buffers])
        return pickle.loads(parts[0], buffers=parts[1:])
    except Exception as exc:
        raise SerializationError(f"cannot unpickle a scattered object: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------- the producer's side


class Ref:
    """A value scattered once (``Client.scatter``); pass it to any number of tasks, at any depth of their
    arguments, and each worker gets the value itself (read-only where it is a buffer, such as an array).

    The value stays on the cluster while a Ref to it lives in this process (or
    until ``release()``), and while a task using it is unfinished.
    """

    __slots__ = ("__weakref__", "_store", "digest", "nbytes")

    def __init__(self, digest: bytes, store: Store | None, nbytes: int) -> None:
        global made  # noqa: PLW0603 - a one-way switch, read on every submit
        made = True
        self.digest, self._store, self.nbytes = digest, store, nbytes

    def release(self) -> None:
        """Let the value go now (as when this Ref is collected); the Ref can no longer be used."""
        store, self._store = self._store, None
        if store is not None:
            store.drop(self.digest)

    def __reduce__(self) -> tuple[Any, ...]:
        found: list[bytes] | None = getattr(_local, "found", None)
        if found is not None:  # a client is pickling a task's arguments: the task will refer to it
            found.append(self.digest)
        return _resolve, (self.digest,)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001, S110 - at interpreter exit the client may be half gone
            pass

    def __repr__(self) -> str:
        state = "" if self._store is not None else ", released or not of this process"
        return f"<zpar.Ref {self.digest.hex()[:12]} ({self.nbytes} bytes{state})>"


class Store:
    """One client's scattered objects: digest -> blob, with the count of live Refs to each. Thread-safe.

    ``release(digest)`` is called (from whatever thread drops the last Ref)
    once no Ref to that digest is left.
    """

    def __init__(self, release: Callable[[bytes], None], shared: Any = None) -> None:
        self._release = release
        self._shared = shared  # a zpar._shm.Space on the embedded cluster's host, else None
        # Reentrant: a Ref collected by the garbage collector inside put() or blobs() drops in this thread.
        self._lock = threading.RLock()
        self._held: dict[bytes, list[Any]] = {}  # digest -> [blob, live Refs]
        self.closed = False

    def put(self, obj: Any) -> Ref:
        if self.closed:
            raise RuntimeError("this zpar Client is closed: scatter with an open one")
        blob = pack(obj, self._shared)
        from .serialize import check_payload

        check_payload([blob], "scattered object")
        digest = P.digest(blob)
        with self._lock:
            entry = self._held.get(digest)
            if entry is None:
                self._held[digest] = [blob, 1]
            else:
                entry[1] += 1
        return Ref(digest, self, len(blob))

    def drop(self, digest: bytes) -> None:
        with self._lock:
            entry = self._held.get(digest)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._held[digest]
        if not self.closed:
            self._release(digest)

    def blobs(self, digests: Iterable[bytes]) -> dict[bytes, P.Frame]:
        """The blobs of ``digests``; ValueError if one is not a live object of this client."""
        with self._lock:
            try:
                return {d: self._held[d][0] for d in digests}
            except KeyError as exc:
                raise ValueError(
                    f"the task's arguments hold a zpar.Ref ({exc.args[0].hex()[:12]}) this client did not scatter, or "
                    "one already released: scatter the value with the client that submits the task "
                    "(client.scatter(value))") from None

    def close(self) -> None:
        """The client closed: the broker frees what it held for it."""
        self.closed = True
        with self._lock:
            self._held.clear()


def begin() -> None:
    """This thread is about to pickle a task's arguments: note the Refs it meets (see ``taken``)."""
    _local.found = []


def taken() -> tuple[bytes, ...]:
    """The digests of the Refs pickled since ``begin`` (each once), and stop noting."""
    found: list[bytes] | None = getattr(_local, "found", None)
    _local.found = None
    return tuple(dict.fromkeys(found)) if found else ()


# ----------------------------------------------------------------- futures as arguments


class Deferred(Exception):
    """A pending zpar Future met while pickling, with no client noting Futures: the client pickles the task
    again, noting them (``begin_deps``). Pickled anywhere else, a pending Future cannot be."""

    def __init__(self) -> None:
        super().__init__("a pending zpar Future can be pickled only as an argument of a task submitted with the "
                         "client that made it (wait for its result to pass the value elsewhere)")


#: True once a pending Future met a pickler: from then on clients note Futures while pickling each task.
futures_met = False


def depend(future: Any) -> tuple[Any, ...]:
    """What a pending Future pickles as, in a task's arguments: the index of its value among the task's."""
    deps: dict[Any, int] | None = getattr(_local, "deps", None)
    if deps is None:
        global futures_met  # noqa: PLW0603 - a one-way switch, read on every submit
        futures_met = True
        raise Deferred
    return _dependency, (deps.setdefault(future, len(deps)),)


def given(value: Any) -> Any:
    """What a done Future pickles as: its value, there and then."""
    return value


def begin_deps() -> None:
    """This thread is about to pickle a task's arguments: note the pending Futures among them."""
    _local.deps = {}


def deps_taken() -> list[Any]:
    """The pending Futures pickled since ``begin_deps``, in the order of their indexes; stop noting."""
    deps: dict[Any, int] | None = getattr(_local, "deps", None)
    _local.deps = None
    return list(deps) if deps else []


# ----------------------------------------------------------------- the worker's side


class WorkerObjects:
    """A worker's scattered objects: blobs as they came, values unpickled once, on first use."""

    def __init__(self, shared: bool = False) -> None:
        self.blobs: dict[bytes, P.Frame] = {}
        self.values: dict[bytes, Any] = {}
        self.shared = shared  # on the embedded cluster: blobs may name shared-memory segments

    def add(self, digest: bytes, blob: P.Frame) -> None:
        self.blobs.setdefault(digest, blob)

    def drop(self, digests: Iterable[bytes]) -> None:
        for digest in digests:
            self.blobs.pop(digest, None)
            self.values.pop(digest, None)

    def value(self, digest: bytes) -> Any:
        try:
            return self.values[digest]
        except KeyError:
            pass
        blob = self.blobs.get(digest)
        if blob is None:
            raise LookupError(f"the scattered object {digest.hex()[:12]} is not on this node (released before the "
                              "task ran?)")
        value = self.values[digest] = unpack(blob, self.shared)
        return value


class resolving:  # a context manager named as the call reads: ``with resolving(objects): loads(...)``
    """Within it, Refs unpickled in this thread resolve to ``objects``' values, and the task's dependencies
    (pending Futures when it was submitted) to the objects named by ``values``, in order."""

    __slots__ = ("objects", "values")

    def __init__(self, objects: WorkerObjects, values: tuple[bytes, ...] = ()) -> None:
        self.objects, self.values = objects, values

    def __enter__(self) -> None:
        _local.objects, _local.values = self.objects, self.values

    def __exit__(self, *exc: object) -> None:
        _local.objects = _local.values = None


def held() -> list[bytes]:
    """The digests of the scattered objects this worker holds now (for tests and tools; empty elsewhere)."""
    objects: WorkerObjects | None = getattr(_worker, "objects", None)
    return sorted(objects.blobs) if objects is not None else []


class _WorkerSlot:
    objects: WorkerObjects | None = None


_worker = _WorkerSlot()  # the worker process's cache, for ``held`` (set by zpar.agent.worker)


def _resolve(digest: bytes) -> Any:
    """What a pickled Ref becomes: its value in a worker running a task, else a detached Ref."""
    objects: WorkerObjects | None = getattr(_local, "objects", None)
    if objects is None:
        return Ref(digest, None, 0)
    return objects.value(digest)


def _dependency(index: int) -> Any:
    """What a pending Future in a task's arguments becomes in the worker: the value of the task it stood for."""
    objects: WorkerObjects | None = getattr(_local, "objects", None)
    values: tuple[bytes, ...] | None = getattr(_local, "values", None)
    if objects is None or not values or index >= len(values):
        raise LookupError("a zpar Future stood in these arguments for another task's value, and the value did not "
                          "come with them")
    return objects.value(values[index])
