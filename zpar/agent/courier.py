"""A worker's batch, watched from a second thread: no result and no task is left behind a long task.

A worker runs a batch's tasks one after the other and cannot know how long
the next one runs: the agent batches tasks by their measured durations, and
``sleep(0)`` then ``sleep(6)`` fools it. Holding the results to the end of
the batch keeps finished results behind the long task; running the batch to
its end keeps its later tasks there too, while another worker may be idle.
Sending each result in its own message instead would make the agent read a
message per task (measured: a third less throughput for tiny tasks).

So the worker's loop takes its tasks from a ``Courier`` and hands it each
result; the results go in one message when the batch ends. The courier's
thread looks at the batch every ``DELAY``; once it has seen the same task
running at two looks (so that a short task the loop was slow to leave, this
process not being scheduled on a busy machine, is not taken for a long
one), it steps in:

- it sends the results made so far (RESULT);
- it gives the tasks not started back to the agent (GIVE_BACK:
  "not run here, queue them again"), which hands them to an idle worker, or
  to the first one free. A channel task stays: its producer's objects may
  already be on their way here.

A task that streams does both at its first item, from the loop: a stream
may run for hours, and reads the socket while it waits for its producer.
Its items go in batches too (zpar.agent.worker holds them): the courier
sends, at each look, the items a task made and then stopped yielding for a
while, and before a task's result it sends the task's items.

A batch of short tasks is never split, however long it runs in all; no
result and no task waits more than about twice ``DELAY`` behind a long task
(plus, for a task that holds the GIL, Python's switch interval, 5 ms, at
each look).

``Batch`` is the rule, with no thread and no clock; ``Courier`` the thread
around it. The worker's socket is shared by the two threads, never at once
(ZeroMQ sockets are not thread-safe): every send holds ``Courier.lock``
(also the memory barrier the ZeroMQ guide asks for when a socket changes
thread), and the loop reads the socket only when the courier has nothing to
send: between batches, and while a task streams. The loop does not hold the
lock while it waits, so the courier never wakes just as a batch arrives.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence

from zpar import protocol as P

#: Seconds the courier sees a task running before it sends the results before it and gives back the
#: tasks after it: twice what the agent calls a long task (slots.ALONE_US), so short ones are left alone.
DELAY = 0.002
#: Looks with no batch under way before the courier's thread sleeps until the next batch (100 ms).
IDLE_LOOKS = 50
#: Seconds between looks while a task streams: the items it holds and then stops yielding wait no longer.
STREAM_LOOK = 0.001


class Batch:
    """The batch a worker runs: the tasks not started, the results not sent, and the task running now."""

    __slots__ = ("delay", "gave_back", "held", "looked_after", "running", "seen", "seen_at", "seq", "todo")

    def __init__(self, delay: float = DELAY) -> None:
        self.delay = delay
        self.todo: collections.deque[P.TaskEntry] = collections.deque()
        self.held: list[P.ResultEntry] = []
        self.seq = 0  # counts the tasks started: names the one running now
        self.running = False
        self.seen, self.seen_at = -1, 0.0  # the task the courier last saw running, and when it first saw it
        self.looked_after = -1  # the task that ran long and the courier acted for
        self.gave_back = False

    @property
    def busy(self) -> bool:
        """A batch is under way: a task runs, or some wait."""
        return self.running or bool(self.todo)

    @property
    def acted(self) -> bool:
        """The task running now ran long and the courier has done what it can for it (results sent, tasks back)."""
        return self.running and self.looked_after == self.seq

    def begin(self, tasks: Sequence[P.TaskEntry]) -> None:
        self.todo.extend(tasks)
        self.gave_back = False

    def next(self) -> P.TaskEntry | None:
        """The next task to run, or None: the batch is over (done, or the rest given back)."""
        if not self.todo:
            return None
        self.seq += 1
        self.running = True
        return self.todo.popleft()

    def done(self, entry: P.ResultEntry) -> None:
        """The task running now ended with this result."""
        self.running = False
        self.held.append(entry)

    def take(self) -> list[P.ResultEntry]:
        """Every result held, in the order made; none is held after."""
        out, self.held = self.held, []
        return out

    def end(self) -> None:
        self.todo.clear()
        self.running = False

    def look(self, now: float) -> tuple[list[P.ResultEntry], list[int]]:
        """The courier looks at the batch ``now``: what to send (results, ids of the tasks given back).

        Something goes once a task is seen running at two looks ``delay``
        apart, once per task.
        """
        if not self.running or self.looked_after == self.seq:
            return [], []
        if self.seen != self.seq:
            self.seen, self.seen_at = self.seq, now
            return [], []
        if now - self.seen_at < self.delay:
            return [], []
        self.looked_after = self.seq
        return self.take(), self.give_back()

    def give_back(self) -> list[int]:
        """The ids of the tasks not started, ours no longer (channel tasks stay ours); once a batch."""
        if self.gave_back:
            return []
        self.gave_back = True
        back = [t.id for t in self.todo if not t.flags & P.FLAG_CHANNEL]
        if back:
            kept = [t for t in self.todo if t.flags & P.FLAG_CHANNEL]
            self.todo.clear()
            self.todo.extend(kept)
        return back


class Courier:
    """A worker's batch and the thread that watches it.

    ``send_results(entries)``, ``give_back(ids)`` and ``send_items(due)``
    (send the stream items the loop holds; ``due``: only if it has held them
    a while) are called with ``lock`` held.
    ``begin``, ``done``, ``streaming`` and ``end`` are the loop's (one lock a
    task); ``close`` stops the thread.

    The thread looks every ``delay`` while batches come (every
    ``STREAM_LOOK`` while a task streams), and sleeps once none
    has run for ``IDLE_LOOKS`` looks: the loop does not wake it per batch (a
    wake-up, and a turn of the GIL, for each of many small batches).
    """

    def __init__(self, send_results: Callable[[list[P.ResultEntry]], None], give_back: Callable[[list[int]], None],
                 delay: float = DELAY, clock: Callable[[], float] = time.monotonic,
                 send_items: Callable[[bool], None] = lambda due: None) -> None:
        self.lock = threading.Lock()  # held around the batch and every send on the worker's socket
        self._send_results = send_results
        self._give_back = give_back
        self._send_items = send_items
        self._clock = clock
        self._batch = Batch(delay)
        self._looking = threading.Event()  # set while batches come: the thread looks every delay
        self._streaming = False  # the task running now streams: look every STREAM_LOOK
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="zpar-courier", daemon=True)
        self._thread.start()

    @property
    def looking(self) -> bool:
        """Whether the thread looks at the batch every delay now (False: it sleeps until the next batch)."""
        return self._looking.is_set()

    def begin(self, tasks: Sequence[P.TaskEntry]) -> P.TaskEntry | None:
        """A batch arrives: its first task, to run now (the next ones come from ``done``)."""
        with self.lock:
            self._batch.begin(tasks)
            if not self._looking.is_set():  # under the lock: the thread clears it under the lock too
                self._looking.set()
            return self._batch.next()

    def done(self, entry: P.ResultEntry, send: bool = False) -> P.TaskEntry | None:
        """The result of the task that ran (``send``: it goes now, else with the batch's, or earlier if a
        later task runs long), and the next task to run; None when the batch is over (the rest may have
        been given back)."""
        with self.lock:
            self._streaming = False
            self._batch.done(entry)
            if send:
                self._send_items(False)  # a stream's items go ahead of its result
                self._flush_locked()
            task = self._batch.next()
            if task is not None and not self._looking.is_set():  # it stopped looking at a long task
                self._looking.set()
            return task

    def streaming(self) -> None:
        """The task running now streams: the results before it go now, the tasks after it go back.

        After this the courier has nothing to send while the task runs: it
        may read the socket.
        """
        with self.lock:
            self._streaming = True
            if not self._looking.is_set():
                self._looking.set()
            self._flush_locked()
            back = self._batch.give_back()
            if back:
                self._give_back(back)

    def end(self) -> None:
        """The batch is over: the results held go now."""
        with self.lock:
            self._send_items(False)
            self._flush_locked()
            self._batch.end()

    def close(self) -> None:
        self._closed = True
        self._looking.set()
        self._thread.join(timeout=1.0)

    def _flush_locked(self) -> None:
        if self._batch.held:
            self._send_results(self._batch.take())

    def _run(self) -> None:
        idle = 0
        while True:
            self._looking.wait()
            if self._closed:
                return
            time.sleep(STREAM_LOOK if self._streaming else self._batch.delay)  # without the GIL: the task runs on
            with self.lock:
                # Items a task made and then stopped yielding for a while: they go now, not at its next
                # yield. The loop sends them itself while it yields (worker.ITEMS_DELAY).
                self._send_items(True)
                results, back = self._batch.look(self._clock())
                if results:
                    self._send_results(results)
                if back:
                    self._give_back(back)  # behind the results before it: the agent sees them in order
                idle = 0 if self._batch.busy else idle + 1
                if self._batch.acted and not self._streaming:
                    # Nothing more to do for a long task: no wake-up (and turn of the GIL) every delay
                    # while it computes; done() or streaming() wakes the thread.
                    self._looking.clear()
                elif idle >= IDLE_LOOKS:
                    idle = 0
                    self._looking.clear()  # the next batch's begin sets it again
