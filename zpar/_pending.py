"""The producer's pending table: every task handed over and not yet ended, kept whole.

A task enters when the client's I/O thread takes it (zpar._producer) and
leaves once: with a value, an exception, or a cancel. Leaving gives its slot
of the client's window back (``release``) exactly then, and resolves its
future at most once (a future the user cancelled meanwhile stays cancelled).
Kept whole, its entry with the payload attached, a task can be sent again
after the broker lost it. When the link ends, ``abandon`` fails or cancels
whatever is still open.

A future the user cancels is CANCELLED at once and CANCELLED_AND_NOTIFIED
(done for ``wait`` and ``as_completed``) once this thread has seen the cancel,
as a stdlib executor's would: whichever of ``add``, ``cancelled``, ``settle``
or ``abandon`` meets it notifies it, once (``Future._notify_cancelled``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
from collections.abc import Callable, Iterator
from typing import Any

from . import protocol as P
from .futures import Future
from .options import TaskOptions

log = logging.getLogger(__name__)


class PendingTask:
    """A task the producer has not seen finish; kept whole (its entry, payload attached) so it can be sent again."""

    __slots__ = ("blob", "deps", "entry", "future", "id", "name", "objects", "opts", "reruns")

    def __init__(self, entry: P.TaskEntry, blob: bytes, opts: TaskOptions, future: Future,
                 objects: dict[bytes, P.Frame] | None = None, name: str = "", deps: tuple[Future, ...] = ()) -> None:
        self.id, self.entry, self.blob = entry.id, entry, blob
        self.name = name  # its function's, for people (the broker's task history): P.Function.name
        self.opts, self.future = opts, future
        self.objects = objects  # the blobs of the scattered objects its entry's ``refs`` name (zpar._refs)
        self.reruns = 0  # runs asked again because the task raised one of opts.retry_on
        self.deps = deps  # the Futures whose values it takes (its entry's sched.deps): pending when submitted

    @property
    def exchanged(self) -> bool:
        """The task has sent or been sent a stream item: running it again could repeat or lose one."""
        stream = self.future._stream
        return stream is not None and stream.exchanged


class Window:
    """The client's window: ``acquire`` takes one of ``size`` slots, ``release`` (any thread) gives one back.

    A ``threading.Semaphore`` is a Python lock and condition: about 1 us a task
    between ``acquire`` and ``release``. Here the slots are tokens in a queue
    written in C, and ``release`` is its ``put``.
    """

    __slots__ = ("_get", "release")

    def __init__(self, size: int) -> None:
        tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(size):
            tokens.put(None)
        self._get = tokens.get
        self.release: Callable[[], None] = functools.partial(tokens.put, None)

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a slot; False if none came free within ``timeout`` seconds (None: wait for one)."""
        try:
            self._get(timeout=timeout)
        except queue.Empty:
            return False
        return True


class PendingTable:
    """The unfinished tasks by id; ``release()`` gives one window slot back as each leaves."""

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release
        self._tasks: dict[int, PendingTask] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, tid: int) -> bool:
        return tid in self._tasks

    def __iter__(self) -> Iterator[PendingTask]:
        return iter(list(self._tasks.values()))  # a copy: tasks may leave during the walk

    def get(self, tid: int) -> PendingTask | None:
        return self._tasks.get(tid)

    def add(self, task: PendingTask) -> bool:
        """Take ``task`` in; False (its slot given back) if its future is done already: cancelled before it left."""
        if task.future.done():
            self.release()
            task.future._notify_cancelled()
            return False
        self._tasks[task.id] = task
        return True

    def cancelled(self, tid: int) -> bool:
        """The user cancelled task ``tid``'s future: True if it was here (and has now left)."""
        task = self._tasks.get(tid)
        if task is None:
            return False  # done already, or not handed over yet (``add`` drops it)
        self._leave(task)
        task.future._notify_cancelled()
        return True

    def resolve(self, task: PendingTask, value: Any) -> None:
        """``task`` leaves with ``value``."""
        self._leave(task)
        settle(task.future, value, None)

    def fail(self, task: PendingTask, exc: BaseException) -> None:
        """``task`` leaves with ``exc``."""
        self._leave(task)
        settle(task.future, None, exc)

    def _leave(self, task: PendingTask) -> None:
        """``task`` leaves the table, its window slot given back, and its arguments let go before its future is
        done (a shared-memory file with them), whichever way it ends."""
        del self._tasks[task.id]
        self.release()
        task.entry = _ENDED

    def fail_all(self, exc: BaseException) -> None:
        for task in self:
            self.fail(task, exc)

    def clear(self) -> list[Future]:
        """Empty the table (the link ended) and return the futures; no slot is given back: the client is done."""
        futures = [task.future for task in self._tasks.values()]
        self._tasks.clear()
        return futures


#: What an ended task's entry becomes: its payload let go at once (zpar._shm removes an argument's file when its
#: frames go), not when the I/O thread next drops its last reference to the task, after its future is done.
_ENDED = P.TaskEntry(0, b"", ())


def settle(fut: Future, value: Any, exc: BaseException | None) -> None:
    """Complete ``fut`` with ``exc``, or else ``value``; never raises.

    A future the user cancelled meanwhile stays cancelled (and is notified:
    its cancel may never reach the table). A done-callback's exception is
    logged by concurrent.futures, but only an Exception: anything else is
    logged here, for this runs in the client's I/O thread.
    """
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except concurrent.futures.InvalidStateError:
        fut._notify_cancelled()
    except BaseException:  # a done-callback raised SystemExit or the like: the future is done all the same
        log.exception("a done-callback of zpar task %d raised", fut.task_id)


def abandon(futures: list[Future], failure: BaseException | None) -> None:
    """The link ended with ``futures`` open: fail them with ``failure``, or (a close) cancel them."""
    for fut in futures:
        if failure is not None:
            settle(fut, None, failure)
        else:
            fut._on_cancel = None  # nobody to tell: the loop has ended
            fut.cancel()
            fut._notify_cancelled()  # cancelled by the user before, and not notified yet
