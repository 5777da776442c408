"""The Future that ``Client.submit`` returns."""

from __future__ import annotations

import _thread
import collections
import concurrent.futures
from collections.abc import Callable, Generator, Iterator
from typing import Any

from .streaming import FeedOp, StreamState

_CANCELLED = "CANCELLED"  # concurrent.futures' state before waiters are told
_PENDING = "PENDING"
_FINISHED = "FINISHED"


class _Condition(_thread.RLock):  # type: ignore[misc]  # typeshed says final; CPython allows it
    """What a stdlib Future asks of its ``threading.Condition``, in one object.

    A ``threading.Condition`` is eight objects for the collector to track (its
    dict, its deque, five bound methods of its lock), made for every task
    whether anyone waits or not; this is an RLock (entered and left in C) with
    a queue of waiters made by the first ``wait``. ``concurrent.futures``
    calls ``acquire``, ``release``, ``wait`` and ``notify_all``, under the lock.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: collections.deque[Any] | None = None

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock until notified or ``timeout`` seconds pass; True if notified."""
        if not self._is_owned():  # type: ignore[attr-defined]  # the C RLock's, as threading.Condition uses
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = collections.deque()
        waiters.append(waiter)
        saved = self._release_save()  # type: ignore[attr-defined]
        notified = False
        try:
            if timeout is None:
                notified = waiter.acquire()
            else:
                notified = waiter.acquire(True, timeout) if timeout > 0 else waiter.acquire(False)
            return notified
        finally:
            self._acquire_restore(saved)  # type: ignore[attr-defined]
            if not notified:
                try:
                    waiters.remove(waiter)
                except ValueError:
                    pass  # notified just after the timeout

    def notify_all(self) -> None:
        """Wake every thread in ``wait``."""
        waiters = self._waiters
        while waiters:
            waiters.popleft().release()


class Future(concurrent.futures.Future[Any]):
    """A ``concurrent.futures.Future`` for a zpar task; also awaitable from asyncio.

    ``concurrent.futures.wait`` and ``as_completed`` accept it as they are,
    and its ``repr`` is the stdlib's (``<Future at 0x... state=pending>``).
    It is never RUNNING: the client cannot tell a queued task from a running
    one (``running()`` is False until the result is in).
    ``cancel()`` succeeds until the result is in: a queued task is dropped by
    the broker and never runs; the result of one already running is discarded,
    or, with ``cancel(force=True)``, its worker is stopped. A task that streams
    or talks over its channel is always stopped.

    ``stream()``, ``receive()``, ``ready()``, ``send()`` and ``close_input()``
    are the producer's end of the task's stream and channel: see
    ``zpar.streaming``.
    """

    # Class defaults, set on an instance only when it streams: nothing more per ordinary task.
    _stream: StreamState | None = None  # made when the task first streams, or is asked to
    _claimed = False  # stream() or receive() was called: the items are wanted
    _unwanted = False  # result() came first: the items are not

    def __init__(self, task_id: int = 0, on_cancel: Callable[[Future, bool], None] | None = None,
                 on_feed: Callable[[FeedOp], None] | None = None) -> None:
        # concurrent.futures.Future.__init__'s fields (a test pins them), with a lighter condition:
        # one is made per task.
        self._condition = _Condition()  # type: ignore[assignment]
        self._state = _PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[concurrent.futures.Future[Any]], object]] = []
        self.task_id = task_id
        self._on_cancel = on_cancel
        self._on_feed = on_feed

    def __reduce__(self) -> tuple[Any, ...]:
        """In a task's arguments, its value: at once if it is in; else the task waits for this one's (see
        ``Client.submit``). Elsewhere a pending Future cannot be pickled."""
        from . import _refs

        with self._condition:
            state, exc, value = self._state, self._exception, self._result
        if state == _FINISHED and exc is None:
            return _refs.given, (value,)
        return _refs.depend(self)

    def cancel(self, force: bool = False) -> bool:
        """Cancel the task unless its result is in (True if cancelled; ``force``: stop it even if running).

        As with the stdlib's futures, the state is CANCELLED at once, and
        CANCELLED_AND_NOTIFIED (done for ``wait`` and ``as_completed``) once
        the client's I/O thread has taken the cancel, an instant later.
        """
        if not super().cancel():
            return False
        if self._on_cancel is None:
            self._notify_cancelled()  # nobody else will: a future of no client, or of one that closed
        else:
            # A stream left running would wait at its window for ever: stop it.
            self._on_cancel(self, force or self._stream is not None)
        return True

    def _notify_cancelled(self) -> None:
        """CANCELLED -> CANCELLED_AND_NOTIFIED, telling ``wait`` and ``as_completed``; once, whoever calls first.

        The executor's step (``set_running_or_notify_cancel``), for the client's
        I/O thread (zpar._pending) once it has seen the cancel.
        """
        with self._condition:  # reentrant: set_running_or_notify_cancel takes it too
            if self._state == _CANCELLED:
                self.set_running_or_notify_cancel()

    def result(self, timeout: float | None = None) -> Any:
        if not self._claimed:  # inline: this is every task's path
            self._unwanted = True
            if self._stream is not None:
                self._stream.discard()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._claimed:
            self._give_up_items()
        return super().exception(timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        if not self._claimed:
            self._give_up_items()
        import asyncio  # here: 20 ms of imports that a client never awaiting a future does without

        return asyncio.wrap_future(self).__await__()

    # ------------------------------------------------------------------ streams (zpar.streaming)

    def _give_up_items(self) -> None:
        self._unwanted = True
        st = self._stream
        if st is not None:
            st.discard()

    def _stream_state(self) -> StreamState:
        st = self._stream
        if st is None:
            with self._condition:
                if self._stream is None:
                    self._stream = StreamState(self, self.task_id, self._feed)
                st = self._stream
            if self._unwanted and not self._claimed:  # result() was called before the first item
                st.discard()
        return st

    def _feed(self, op: FeedOp) -> None:
        if self._on_feed is None:
            raise RuntimeError("this future belongs to no client: it cannot stream")
        self._on_feed(op)

    def stream(self, timeout: float | None = None) -> Iterator[Any]:
        """Each object the task sends, in order, until it returns; then its error, if it failed.

        ``timeout`` bounds the wait for each next item (TimeoutError).
        """
        self._claimed = True
        return self._stream_state().iterate(timeout)

    def receive(self, timeout: float | None = None) -> Any:
        """The next object the task sent; EOFError once it returned and all were taken."""
        self._claimed = True
        return self._stream_state().take(timeout)

    def ready(self) -> bool:
        """True when ``receive()`` would not block: an object waits, or the task has ended."""
        return self._stream_state().ready()

    def add_ready_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` each time an object from the task arrives, and when it ends.

        It runs in the client's I/O thread: keep it short and non-blocking
        (set a flag, write to a pipe); what it raises is logged.
        """
        self._stream_state().add_callback(fn)

    def send(self, obj: Any, timeout: float | None = None) -> None:
        """Send ``obj`` to the task's ``channel.receive()``; blocks while WINDOW sent objects are unread."""
        self._stream_state().send(obj, timeout)

    def close_input(self) -> None:
        """Nothing more will be sent: the task's ``receive()`` raises EOFError after what was."""
        self._stream_state().close_input()
