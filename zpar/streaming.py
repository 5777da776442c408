"""Streaming tasks and two-way channels to a running task.

Streams: a generator's values as it makes them
-----------------------------------------------

A task whose function returns a generator streams each value it yields to the
producer as soon as it is made::

    def numbers(n):
        for i in range(n):
            yield i * i
        return "done"                      # becomes the future's result

    fut = client.submit(numbers, 10**6)
    for x in fut.stream():                 # items in the order they were yielded
        ...
    fut.result()                           # -> "done"

Two-way channels: ``client.start``
----------------------------------

``client.start(fn, *args, **kwargs)`` runs ``fn(channel, *args, **kwargs)`` on
a worker, where ``channel`` is this module's :class:`Channel`, and returns the
task's ``zpar.Future`` (the producer's end of the channel)::

    def echo(channel, prefix):             # runs on a worker
        for obj in channel:                # until the producer calls close_input()
            channel.send(prefix + obj)
        return "bye"

    fut = client.start(echo, ">")
    fut.send("a")
    fut.receive(timeout=10)                # -> ">a"
    fut.close_input()
    fut.result(timeout=10)                 # -> "bye"

Any task (a generator too) can reach its own channel with :func:`channel`.

The producer's end: methods of every ``zpar.Future``
---------------------------------------------------

``fut.stream(timeout=None) -> Iterator``
    Yields each object the task sent (a generator's ``yield`` or
    ``channel.send``) in order, each once, then ends when the task has
    returned. If the task raised, was cancelled, timed out or was lost, that
    exception is raised after the items sent before it. ``timeout`` bounds the
    wait for each next item (``TimeoutError``). For a task that sends nothing
    it yields nothing. Several ``stream()``/``receive()`` calls share one queue:
    an item is taken once, whichever takes it.
``fut.receive(timeout=None) -> object``
    The next object the task sent. Raises ``EOFError`` once the task has
    returned and every item was taken; the task's exception if it failed (the
    items before it come first); ``TimeoutError`` (the builtin, which is
    ``concurrent.futures.TimeoutError``) if nothing came within ``timeout``
    seconds; ``SerializationError`` if an item cannot be unpickled here.
``fut.ready() -> bool``
    True when ``receive()`` would not block (an item waits, or the task ended).
``fut.send(obj, timeout=None) -> None``
    Sends ``obj`` (pickled here, in the caller's thread) to the task's
    ``channel.receive()``. Blocks while ``WINDOW`` sent objects (or
    ``WINDOW_BYTES``) are not yet received by the task; ``TimeoutError`` if
    that lasts past ``timeout``. Objects sent before the task starts wait for
    it (in the broker). Raises ``EOFError`` after ``close_input()`` or once
    the task has returned, and the task's exception (or ``CancelledError``)
    if it failed; an object sent just before the task ends is dropped unread. ``SerializationError`` if ``obj`` does not
    pickle.
``fut.close_input() -> None``
    Nothing more will be sent: the task's ``receive()`` raises ``EOFError``
    (and ``for obj in channel`` ends) once it took what was sent before.
``fut.result(timeout=None)``
    The task's return value (a generator's ``return`` value; usually None).
    If neither ``stream()`` nor ``receive()`` was ever called on this future,
    calling ``result()`` (or ``exception()``, or awaiting it) means the items
    are not wanted: they are discarded as they come, so the generator runs to
    its end instead of waiting for a reader. Call ``stream()`` first to get
    the items. Once ``stream()``/``receive()`` was called, ``result()`` just
    waits, and the stream keeps its items for the reader.

:func:`wait_ready(futures, timeout=None) <wait_ready>`
    Blocks until at least one of ``futures`` is ``ready()`` (or ``timeout``
    passes); returns the list of ready ones (empty on timeout). For a
    ``select``-like loop over many channels.

The task's end: :class:`Channel`
--------------------------------

``channel() -> Channel``
    The running task's channel. Raises ``RuntimeError`` outside a task.
``Channel.send(obj) -> None``
    Sends ``obj`` to the producer (``fut.receive()``/``fut.stream()``). Blocks
    while ``WINDOW`` objects (or ``WINDOW_BYTES``) sent are not yet taken by
    the producer, so a fast
    task cannot fill any process's memory. ``SerializationError`` if ``obj``
    does not pickle.
``Channel.receive(timeout=None) -> object``
    The next object from ``fut.send()``. ``EOFError`` once the producer called
    ``close_input()`` and everything before it was taken; ``TimeoutError`` if
    nothing came within ``timeout`` seconds.
``iter(Channel)``
    ``receive()`` until ``EOFError``.

Use a channel from the task's own thread only. Objects travel as task
arguments do (pickle 5, large buffers out of band), each within the same
limits (protocol.MAX_TASK_FRAMES frames, the cluster's max message size).

Flow control: ``WINDOW``
------------------------

Each direction of each task has a window of ``WINDOW`` (4096) objects and
``WINDOW_BYTES`` (8 MiB): the sender may be at most that many objects ahead of
what the receiver has taken (``fut.stream()``/``receive()`` on the producer,
``Channel.receive()`` in the task), and waits while that many bytes it sent
are unread (one larger object still goes, alone). A generator whose items are
not read is paused at its ``yield``, and the memory any process spends on one
stream is bounded by the window.

Items travel many to a message: the worker holds what a task sends for at
most about a millisecond (or ``zpar.agent.worker.ITEMS_BATCH`` items, 64 KiB),
and sends at once an item made after a pause, what it holds when the task
waits (for the window, or in ``Channel.receive()``), and a task's items ahead
of its result. So a fast generator sends a message per few hundred small
items, and a slow one's items arrive within milliseconds.

A stream future is done only when the task has returned, which needs its
items taken: by ``stream()``/``receive()``, or by discarding them (above).
So ``concurrent.futures.wait`` or ``as_completed`` over stream futures nobody
reads will wait at the window; read them, or call ``result()``.

Failures, retries and cancel
----------------------------

- An exception inside the generator (or ``fn``) ends the stream: the items
  yielded before it are delivered, then ``stream()``/``receive()``/``result()``
  raise it (as tasks' exceptions travel: its own type, or ``TaskError``).
- Per-task ``timeout`` (``client.options(timeout=...)``) covers the whole
  stream, including time paused at the window: ``TaskTimeout``.
- ``fut.cancel()`` and ``client.cancel([fut], force=True)`` stop a running
  stream or channel task (its worker is stopped and replaced); the reader gets
  ``CancelledError`` after the items already here.
- Retries: a task lost to infrastructure (its worker or node died, the broker
  restarted) *before* it sent or received anything is run again, like any
  task. Once it has exchanged an item (a yield, ``Channel.send``, or an object
  from ``fut.send()`` delivered to it) it is never run again: its future fails
  with ``WorkerLost``, after the items that arrived. No item is delivered
  twice (items carry sequence numbers; a repeat is dropped), and generators
  need not be deterministic or idempotent.
- Items lost in transit (a connection broke under them) are detected by
  sequence number: the stream fails with ``WorkerLost`` instead of skipping.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

from . import protocol as P
from . import serialize
from ._flow import Arrival, ReceiveWindow, SendWindow
from .errors import PayloadTooLarge

_log = logging.getLogger(__name__)

__all__ = ["WINDOW", "WINDOW_BYTES", "Channel", "channel", "wait_ready"]

#: How many objects a sender may be ahead of its reader, in each direction of each task ...
WINDOW = P.STREAM_WINDOW
#: ... and how many bytes of them may be unread before it waits.
WINDOW_BYTES = P.STREAM_BYTES
#: Items ``fut.stream()`` takes from the queue at once.
RUN = 256


# --------------------------------------------------------------------------
# The task's end (in the worker process)


class _Port(Protocol):
    """What a Channel needs of the worker it runs in (zpar.agent.worker.Worker)."""

    current: int | None

    def send_item(self, tid: int, frames: list[Any]) -> None: ...

    def receive_item(self, tid: int, timeout: float | None) -> Sequence[Any]: ...


#: Set by the worker process when it starts; None anywhere else.
_port: _Port | None = None


class Channel:
    """A running task's end of its two-way channel to the producer (see the module docstring)."""

    __slots__ = ("_port", "task_id")

    def __init__(self, task_id: int, port: _Port) -> None:
        self.task_id = task_id
        self._port = port

    def send(self, obj: Any) -> None:
        """Send ``obj`` to the producer; blocks while it has WINDOW objects unread."""
        self._port.send_item(self.task_id, serialize.dumps(obj, what="object sent on the channel"))

    def receive(self, timeout: float | None = None) -> Any:
        """The next object the producer sent; EOFError after its ``close_input()``; TimeoutError."""
        frames = self._port.receive_item(self.task_id, timeout)
        return serialize.loads(frames, what="object received on the channel")

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.receive()
            except EOFError:
                return

    def __reduce__(self) -> Any:
        raise TypeError("a zpar Channel belongs to its running task and cannot be pickled or passed on")

    def __repr__(self) -> str:
        return f"<zpar.streaming.Channel of task {self.task_id}>"


def channel() -> Channel:
    """The channel of the task running in this thread's worker; RuntimeError outside a task."""
    port = _port
    if port is None or port.current is None:
        raise RuntimeError("zpar.streaming.channel() works only inside a task running on a zpar worker")
    return Channel(port.current, port)


# --------------------------------------------------------------------------
# The producer's end (zpar.Future's stream methods use this)

#: What a stream hands the client's I/O thread: ("item", tid, seq, frames), ("credit", tid, upto),
#: or ("close", tid).
FeedOp: TypeAlias = tuple[Any, ...]


class _Listener(Protocol):
    def set(self) -> None: ...


class _Callback:
    """A listener that calls a function (Future.add_ready_callback); its errors are logged, never raised."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def set(self) -> None:
        try:
            self.fn()
        except Exception:  # noqa: BLE001 -- this runs in the client's I/O thread, which must go on
            _log.exception("a ready callback of a zpar future raised")


class StreamState:
    """The producer's end of one task's stream: items in, objects out, credits both ways.

    ``fut`` is the task's future (zpar.Future): the stream ends when it is
    done, with its exception if it failed. The flow-control rule is
    zpar._flow's, one window each way; this class adds the lock, the queue
    of items and the waiting.

    The client's I/O thread calls ``arrived`` and ``granted``; user threads the
    rest. ``feed`` hands an operation to the I/O thread (it wakes it up).
    ``listeners``: objects with a ``set()`` method (``threading.Event``s of
    ``wait_ready``; zpar.pprocess adds its own), called under ``cond`` each
    time an item arrives and when the task ends; add and remove them under
    ``cond``, and keep ``set()`` short and non-blocking.
    """

    def __init__(self, fut: concurrent.futures.Future[Any], tid: int, feed: Callable[[FeedOp], None]) -> None:
        self.fut = fut
        self.tid = tid
        self.feed = feed
        self.cond = threading.Condition(threading.Lock())
        self.items: collections.deque[Sequence[Any]] = collections.deque()
        self._run: collections.deque[Sequence[Any]] = collections.deque()  # taken from items, ahead of them
        self._unsettled = (0, 0)  # (items, bytes) moved to _run and not yet counted taken (_settle)
        self.inbound = ReceiveWindow()  # the task's items to us
        self.outbound = SendWindow()  # our objects to the task
        self.discarding = False
        self.input_closed = False
        self.exchanged = False  # an item arrived or an object went: the task cannot be run again
        self.listeners: set[_Listener] = set()
        fut.add_done_callback(self._done)

    @property
    def next_seq(self) -> int:
        """The task's items that arrived in order (the next one's seq)."""
        return self.inbound.next_seq

    def add_callback(self, fn: Callable[[], None]) -> None:
        with self.cond:
            self.listeners.add(_Callback(fn))

    # ------------------------------------------------------------------ I/O thread

    def arrived(self, entries: Iterable[P.ItemEntry]) -> tuple[str, int] | None:
        """Items from the task (a run of one message), in order. None, or ``("lost", seq)`` when one before
        ``seq`` was lost (fail the stream; the items before the gap are kept).

        One lock and one wake-up for the run, not one an item. Credits go by ``feed``.
        """
        lost: tuple[str, int] | None = None
        with self.cond:
            new = 0
            nbytes = 0
            arrived = self.inbound.arrived
            for entry in entries:
                arrival = arrived(entry.seq)
                if arrival is not Arrival.NEW:
                    if arrival is Arrival.GAP:
                        lost = ("lost", entry.seq)
                        break
                    continue
                new += 1
                if self.discarding:
                    nbytes += _nbytes(entry.payload)
                else:
                    self.items.append(entry.payload)
            if new:
                self.exchanged = True
                if self.discarding:
                    self._taken(nbytes, new)
                self.cond.notify_all()
                if self.listeners:  # told of each item (Future.add_ready_callback's promise); mostly none
                    for _ in range(new):
                        for event in self.listeners:
                            event.set()
        return lost

    def granted(self, upto: int) -> None:
        """The task has room for our objects with seq < ``upto``."""
        with self.cond:
            if self.outbound.granted(upto):
                self.cond.notify_all()

    def _done(self, _fut: Any) -> None:
        with self.cond:
            self._notify()

    def _notify(self) -> None:
        self.cond.notify_all()
        for event in self.listeners:
            event.set()

    def _taken(self, nbytes: int, count: int = 1) -> None:
        """Under the lock: ``count`` items were taken or discarded; grant the task credit when due."""
        upto = self.inbound.taken(nbytes, count)
        if upto is not None:
            self.feed(("credit", self.tid, upto))

    # ------------------------------------------------------------------ user threads

    def discard(self) -> None:
        """Nobody will read the items: drop those here and those to come (the task runs on)."""
        with self.cond:
            if self.discarding:
                return
            self.discarding = True
            self._run.clear()
            self._settle()
            self._taken(sum(_nbytes(frames) for frames in self.items), len(self.items))
            self.items.clear()

    def _end(self) -> None:
        """Under the lock, no item left and the future done: raise what ended the stream."""
        if self.fut.cancelled():
            raise concurrent.futures.CancelledError(f"task {self.tid} was cancelled")
        exc = self.fut._exception  # done: set once, read here
        if exc is not None:
            raise exc
        raise EOFError(f"task {self.tid} has ended and every item it sent was taken")

    def _wait(self, deadline: float | None, timeout: float | None) -> None:
        """Under the lock, until an item is here (in ``_run`` or ``items``); the end, or TimeoutError."""
        self._settle()  # what was read is credited before we wait for more
        while not self._run and not self.items:
            if self.fut.done():
                self._end()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"task {self.tid} sent nothing within {timeout:g} s")
            self.cond.wait(left)

    def take(self, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._wait(deadline, timeout)
            if self._run:
                frames = self._run.popleft()
                self._settle()
            else:
                frames = self.items.popleft()
                self._taken(_nbytes(frames))
        return serialize.loads(frames, what=lambda: f"object task {self.tid} sent")

    def iterate(self, timeout: float | None) -> Iterator[Any]:
        """Each item, in order, until the task ended (``fut.stream()``); then the task's error, if it failed.

        The items here move to ``_run`` (``RUN`` at most) under one lock;
        readers then pop them from there without the lock (``deque.popleft``
        is atomic), ahead of ``items``, and they count as taken (credit for
        the task) once ``_run`` is empty. An iterator holds no item of its
        own: other readers (``take``) see the same queue.
        """
        what = lambda: f"object task {self.tid} sent"  # noqa: E731 - made once, not an item
        run = self._run
        while True:
            try:
                frames = run.popleft()
            except IndexError:
                try:
                    self._refill(timeout)
                except EOFError:
                    return
                continue
            yield serialize.loads(frames, what=what)

    def _refill(self, timeout: float | None) -> None:
        """Move the items here to ``_run`` (at most RUN), counted taken, waiting up to ``timeout`` for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._wait(deadline, timeout)
            items = self.items
            if self._run or not items:
                return  # another reader refilled it
            n = min(RUN, len(items))
            run = [items.popleft() for _ in range(n)]
            self._unsettled = (n, sum(_nbytes(frames) for frames in run))
            self._run.extend(run)

    def _settle(self) -> None:
        """Under the lock: once every item of ``_run`` was read, count them taken (credit the task)."""
        count, nbytes = self._unsettled
        if count and not self._run:
            self._unsettled = (0, 0)
            self._taken(nbytes, count)

    def ready(self) -> bool:
        with self.cond:
            return bool(self._run) or bool(self.items) or self.fut.done()

    def send(self, obj: Any, timeout: float | None) -> None:
        frames = serialize.dumps(obj, what="object sent to the task")
        if len(frames) > P.MAX_TASK_FRAMES:
            raise PayloadTooLarge(f"the object holds {len(frames) - 1} large buffers; at most "
                                  f"{P.MAX_TASK_FRAMES - 1} fit: send fewer, bigger arrays")
        size = _nbytes(frames)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                if self.input_closed:
                    raise EOFError(f"the input of task {self.tid} was closed (close_input)")
                if self.fut.done():
                    self._end()
                if self.outbound.may_send():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"task {self.tid} has not taken what was sent for {timeout:g} s")
                self.cond.wait(left)
            seq = self.outbound.sent(size)
            self.exchanged = True
            self.feed(("item", self.tid, seq, frames))  # under the lock: in seq order across threads

    def close_input(self) -> None:
        with self.cond:
            if self.input_closed:
                return
            self.input_closed = True
            self.exchanged = True
            self.feed(("close", self.tid))


_nbytes = P.payload_bytes  # bytes, zmq Frames and pickle's raw buffers: len is bytes


class _Streaming(Protocol):
    """What ``wait_ready`` needs of a zpar.Future (named so, this module does not import zpar.futures)."""

    def _stream_state(self) -> StreamState: ...


_F = TypeVar("_F", bound=_Streaming)


def wait_ready(futures: Iterable[_F], timeout: float | None = None) -> list[_F]:
    """Block until one of ``futures`` is ``ready()``; the ready ones, or [] after ``timeout`` seconds."""
    futures = list(futures)
    states = [f._stream_state() for f in futures]
    event = threading.Event()
    for st in states:
        with st.cond:
            st.listeners.add(event)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            event.clear()
            ready = [f for f, st in zip(futures, states, strict=True) if st.ready()]  # states: one per future
            if ready:
                return ready
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            event.wait(left)
    finally:
        for st in states:
            with st.cond:
                st.listeners.discard(event)
