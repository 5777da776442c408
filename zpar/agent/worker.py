"""The worker loop: receive a batch, run its tasks, send their results.

Started by the agent as ``python -m zpar.agent.worker ENDPOINT IDENTITY PARENT_PID``.
A worker talks only to its agent, over one DEALER socket on an ipc pipe of its
own; the agent sends it work only while it is idle, so the agent always knows
which tasks a worker holds.

The batch is watched by a ``courier.Courier``: the results of tiny tasks go
in one message, yet none waits behind a long task for more than
``courier.DELAY``, and the tasks not started by then go back to the agent
(GIVE_BACK) for an idle worker to take.

A task that streams (a generator, or one using its channel: zpar.streaming)
sends ITEMS as it runs and reads FEED from the same socket while it waits for
credits or input. The results of the tasks before it in the batch go ahead of
its first item, and its own result right after it ends.

Its items go many to a message, as results do: held until ``ITEMS_BATCH``
of them (or ``ITEMS_BYTES``) are here, until the task waits (for credits or
for input), ends, or yields again ``ITEMS_DELAY`` after the last message;
an item made after a pause goes at once, and the courier sends what a task
holds and then stops yielding for a while. So a fast generator sends a
message per ITEMS_BATCH items, and a slow one's items are not held back.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import math
import os
import signal
import socket
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

import zmq

from .. import _flow, _refs, _shm, serialize, streaming
from .. import protocol as P
from ..errors import SerializationError, TaskError
from .courier import Courier
from .spawn import RECONNECT_IVL

_POLLIN = int(zmq.POLLIN)  # a plain int: ``int & IntFlag`` builds an enum member each time
_NO_REFS = contextlib.nullcontext()  # a task whose arguments hold no scattered object

_PR_SET_PDEATHSIG = 1

#: A stream's items held before they go in one message (far fewer than protocol.STREAM_WINDOW) ...
ITEMS_BATCH = 256
#: ... or their bytes (a large item goes alone, at once) ...
ITEMS_BYTES = 64 * 1024
#: ... or seconds since the last message: an item yielded this long after it goes at once.
ITEMS_DELAY = 0.001


def _die_with_parent(parent: int) -> None:
    """Exit when the agent dies, even by SIGKILL (Linux), else notice on idle polls."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


class _Stream:
    """One task's stream state in this worker: its items out, the producer's objects in (zpar._flow's rule)."""

    __slots__ = ("closed", "inbound", "inbox", "outbound", "streaming")

    def __init__(self) -> None:
        self.outbound = _flow.SendWindow()  # our items to the producer
        self.inbound = _flow.ReceiveWindow()  # its objects to us
        self.inbox: collections.deque[P.Payload] = collections.deque()
        self.closed = False  # the producer will send nothing more
        self.streaming = False  # the courier was told (Courier.streaming)


class Worker:
    def __init__(self, endpoint: str, identity: bytes, parent: int, chunk: bool = False) -> None:
        self.parent = parent
        self.chunk = chunk  # results cross an encrypted link: send large buffers in chunks
        shm_dir = _shm.from_environment()  # the embedded cluster's: its producer is on this host
        self.shared = _shm.Space(shm_dir, handoff=True) if shm_dir else None
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.funcs: dict[bytes, Callable[..., Any]] = {}
        self.objects = _refs._worker.objects = _refs.WorkerObjects(shared=self.shared is not None)  # Client.scatter's
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_SIZE)
        self.sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL)  # a prestarted worker may beat the pipe's bind
        self.sock.connect(endpoint)
        self.current: int | None = None  # the id of the task running now (zpar.streaming.channel())
        self.streams: dict[int, _Stream] = {}  # tasks of this batch that stream or were sent objects
        # The courier's thread sends results and gives tasks back while a task runs that has not streamed:
        # every send holds courier.lock, and we read the socket only between batches or while a task streams.
        self.courier = Courier(self._send_results, self._give_back, send_items=self._send_held)
        # A stream's items not sent yet (send_item), their bytes, when the first of them was made and when the
        # last ITEMS went; under courier.lock.
        self._items: list[P.ItemEntry] = []
        self._items_bytes = 0
        self._items_held_at = self._items_sent_at = 0.0
        self._bye = False  # the agent asked us to exit while a task ran
        self._error = ""  # the traceback of the task that just raised (_raised), for its result
        streaming._port = self

    def run(self) -> None:
        with self.courier.lock:
            self.sock.send_multipart(P.encode(P.Hello(P.Role.WORKER, pid=self.pid, host=self.host)))
        while not self._bye:
            if not self.sock.poll(1000):  # between batches the courier does not touch the socket
                if os.getppid() != self.parent:
                    return  # the agent is gone; nobody wants our results
                continue
            msg = P.decode(self.sock.recv_multipart(copy=False))  # the agent is trusted
            if isinstance(msg, P.Bye):
                return
            if isinstance(msg, P.Tasks):
                if any(task.parts for task in msg.tasks):
                    whole = self._assembled(msg)
                    if whole is None:
                        return
                    msg = whole
                self.run_batch(msg)
                self.streams.clear()
            elif isinstance(msg, P.Release):
                self.objects.drop(msg.digests)
            # A FEED now is for a task that has ended: nobody will read it.

    def _assembled(self, msg: P.Tasks) -> P.Tasks | None:
        """``msg`` with its tasks' whole payloads, once the rest of them (P.Part) is here: the agent sends each
        part on as it comes, so this hop works while the ones before it still do. None: told to exit meanwhile."""
        waiting = {task.id: P.Assembly(task) for task in msg.tasks if task.parts}
        while not all(assembly.complete for assembly in waiting.values()):
            if not self.sock.poll(1000):
                if os.getppid() != self.parent:
                    return None
                continue
            part = P.decode(self.sock.recv_multipart(copy=False))  # the agent is trusted
            if isinstance(part, P.Part) and part.id in waiting:
                waiting[part.id].add(part)
            elif isinstance(part, P.Bye):
                return None
            elif isinstance(part, P.Release):
                self.objects.drop(part.digests)
        return P.Tasks(tuple(waiting[t.id].whole() if t.parts else t for t in msg.tasks), msg.funcs)

    def run_batch(self, msg: P.Tasks) -> None:
        """Run the batch's tasks (those the courier did not give back), and send every result."""
        for func in msg.funcs:
            self._load_function(func.digest, func.blob)
        courier = self.courier
        task = courier.begin(msg.tasks)
        while task is not None:
            start = time.perf_counter_ns()
            self.current = task.id
            status, rframes = self._run_one(task)
            self.current = None
            entry = P.ResultEntry(task.id, status, rframes, (time.perf_counter_ns() - start) // 1000, None, self.pid,
                                  self._error)
            self._error = ""
            # A stream's result goes at once, behind its items.
            task = courier.done(entry, send=bool(self.streams) and task.id in self.streams)
        courier.end()

    def _send_results(self, entries: list[P.ResultEntry]) -> None:
        """Send these results (the courier calls it, holding its lock)."""
        self.sock.send_multipart(P.encode(P.Result(tuple(entries))), copy=False)

    def _give_back(self, ids: list[int]) -> None:
        """Tell the agent these tasks of the batch will not run here (the courier calls it, holding its lock)."""
        self.sock.send_multipart(P.encode(P.GiveBack(tuple(ids))))

    def _load_function(self, d: bytes, blob: Any) -> None:
        if d in self.funcs:
            return
        if _refs.is_object(blob):  # a scattered object rides with the functions: unpickled on first use
            self.objects.add(d, blob)
            return
        try:
            self.funcs[d] = serialize.loads([blob], what="function")
        except Exception as exc:  # noqa: BLE001 - kept as a stand-in that raises, so each task reports it
            message, cause = str(exc), exc.__cause__

            def unloadable(*_a: Any, **_k: Any) -> Any:
                raise SerializationError(message) from cause  # a fresh error each call

            self.funcs[d] = unloadable

    def _run_one(self, task: P.TaskEntry) -> tuple[P.Status, list[Any]]:
        try:
            fn = self.funcs[task.digest]
            values = task.sched.values if task.sched is not None else 0  # the last refs: other tasks' values
            with _refs.resolving(self.objects, task.refs[-values:] if values else ()) if task.refs else _NO_REFS:
                payload = serialize.loads(task.payload, what="task arguments", shared=self.objects.shared)
            args, kwargs = payload
            if task.flags & P.FLAG_CHANNEL:
                args = (streaming.Channel(task.id, self), *args)
            value = fn(*args, **kwargs)
            if type(value) is types.GeneratorType:
                return self._drive(task.id, value)
        except Exception as exc:  # noqa: BLE001 - whatever the task raised is its result
            return P.Status.RAISED, self._raised(exc)
        except BaseException as exc:  # noqa: BLE001 - sys.exit or KeyboardInterrupt inside the task
            return P.Status.RAISED, self._stand_in(exc)
        return self._result(task.id, value)

    def _stand_in(self, exc: BaseException) -> list[Any]:
        """A TaskError for sys.exit or KeyboardInterrupt: the worker goes on; ``remote_type`` names it."""
        stand_in = TaskError(f"the task raised {type(exc).__name__}{exc.args!r}; the worker kept running",
                             type(exc).__name__)
        stand_in.__cause__ = exc
        return self._raised(stand_in)

    def _raised(self, exc: BaseException) -> list[Any]:
        """The frames of a task's exception; its traceback's end, as text, goes in the result's ``error`` too
        (the broker shows it with no unpickling: see protocol.ResultEntry)."""
        tb = "".join(traceback.format_exception(exc))
        self._error = tb[-P.MAX_ERROR_TEXT:]
        return serialize.dump_exception(exc, self.host, self.pid, tb)

    def _result(self, tid: int, value: Any) -> tuple[P.Status, list[Any]]:
        stream = self.streams.get(tid) if self.streams else None
        status = P.Status.OK
        if stream is not None and stream.outbound.next_seq:  # the producer checks it got every item
            status, value = P.Status.STREAMED, (stream.outbound.next_seq, value)
        try:
            frames = serialize.dumps(value, what="result", chunk=self.chunk, shared=self.shared)
            serialize.check_payload(frames, "result")
            return status, frames
        except Exception as exc:  # noqa: BLE001 - an unpicklable or oversized result is the task's error
            return P.Status.RAISED, self._raised(exc)

    # ------------------------------------------------------------------ streams (zpar.streaming)

    def _drive(self, tid: int, gen: types.GeneratorType[Any, Any, Any]) -> tuple[P.Status, list[Any]]:
        """Run a generator task: each value it yields goes to the producer, within the window."""
        self._stream(tid)
        try:
            while True:
                try:
                    item = next(gen)
                except StopIteration as stop:
                    return self._result(tid, stop.value)
                self.send_item(tid, serialize.dumps(item, what="value the generator yielded"))
        except Exception as exc:  # noqa: BLE001 - whatever the generator raised is its result
            return P.Status.RAISED, self._raised(exc)
        except BaseException as exc:  # noqa: BLE001 - sys.exit or KeyboardInterrupt inside the generator
            return P.Status.RAISED, self._stand_in(exc)
        finally:
            gen.close()

    def _stream(self, tid: int) -> _Stream:
        stream = self.streams.get(tid)
        if stream is None:
            stream = self.streams[tid] = _Stream()
        if not stream.streaming:
            # The batch's earlier results go now, ahead of this task's items, and its later tasks go back to
            # the agent: this one may run for hours.
            self.courier.streaming()
            stream.streaming = True
        return stream

    def send_item(self, tid: int, frames: list[Any]) -> None:
        """Send one object to the producer (held a moment, see the module's docstring); blocks (reading
        credits) while the window is full."""
        if len(frames) > 1 or len(frames[0]) > P.INLINE_MAX:  # a small one fits
            serialize.check_payload(frames, "object sent")
        stream = self.streams.get(tid)
        if stream is None or not stream.streaming:
            stream = self._stream(tid)
        window = stream.outbound
        if not window.may_send():
            self._wait_items()  # the producer credits only what it got
            while not window.may_send():
                self._pump(None)
            self._items_sent_at = time.monotonic()  # a wait, not a pause: the next items are batched
        nbytes = P.payload_bytes(frames)
        seq = window.sent(nbytes)
        now = time.monotonic()
        with self.courier.lock:
            items = self._items
            if not items:
                self._items_held_at = now
            items.append(P.ItemEntry(tid, seq, frames))
            self._items_bytes += nbytes
            if (len(items) >= ITEMS_BATCH or self._items_bytes >= ITEMS_BYTES
                    or now - self._items_sent_at >= ITEMS_DELAY):
                self._send_items(now=now)

    def _send_items(self, credits: tuple[P.Credit, ...] = (), now: float | None = None) -> None:
        """Send the items held, and these read credits, if any (called holding courier.lock)."""
        items = self._items
        if items:
            self._items, self._items_bytes = [], 0
            for run in P.batches(items):
                last = run[-1] is items[-1]
                self.sock.send_multipart(P.encode(P.Items(tuple(run), credits if last else ())), copy=False)
            self._items_sent_at = time.monotonic() if now is None else now
        elif credits:
            self.sock.send_multipart(P.encode(P.Items((), credits)))

    def _send_held(self, due: bool) -> None:
        """The courier's call (holding its lock): send the items held; ``due``: only those held ITEMS_DELAY.

        While a task yields, it sends them itself within ITEMS_DELAY; the
        courier's look finds nothing due then, and sends nothing.
        """
        if self._items and (not due or time.monotonic() - self._items_held_at >= ITEMS_DELAY):
            self._send_items()

    def _wait_items(self) -> None:
        """Before the task waits (and the loop reads the socket): the items held go now."""
        if self._items:
            with self.courier.lock:
                self._send_items()

    def receive_item(self, tid: int, timeout: float | None) -> P.Payload:
        """The frames of the next object the producer sent; EOFError at its end, TimeoutError."""
        stream = self._stream(tid)
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = False
        while not stream.inbox:
            self._wait_items()
            if stream.inbound.broken:
                raise ConnectionError(f"an object sent to task {tid} was lost on the way")
            if stream.closed:
                raise EOFError(f"the producer closed the input of task {tid}")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0 and looked:
                raise TimeoutError(f"nothing was sent to task {tid} within {timeout:g} s")
            self._pump(left)
            looked = True
        frames = stream.inbox.popleft()
        upto = stream.inbound.taken(P.payload_bytes(frames))
        if upto is not None:
            with self.courier.lock:
                self._send_items((P.Credit(tid, upto),))
        return frames

    def _pump(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: for ever) for messages from the agent, and take them.

        A stream's task sent the results before it and gave back the tasks
        after it (``_stream``), and its items (``_wait_items``): the courier
        has nothing to send while we wait.
        """
        if not self.sock.poll(None if timeout is None else math.ceil(timeout * 1000)):
            return
        while True:
            events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]  # pyzmq: int | bytes
            if not events & _POLLIN:
                return
            msg = P.decode(self.sock.recv_multipart(copy=False))
            if isinstance(msg, P.Feed):
                self._feed(msg)
            elif isinstance(msg, P.Bye):
                self._bye = True  # after this batch
            elif isinstance(msg, P.Release):
                self.objects.drop(msg.digests)

    def _feed(self, msg: P.Feed) -> None:
        for entry in msg.items:
            stream = self.streams.setdefault(entry.id, _Stream())
            if stream.inbound.arrived(entry.seq) is _flow.Arrival.NEW:
                stream.inbox.append(entry.payload)  # a repeat is dropped; a gap breaks the stream
        for credit in msg.credits:
            held = self.streams.get(credit.id)
            if held is not None:
                held.outbound.granted(credit.upto)
        for tid in msg.closed:
            self.streams.setdefault(tid, _Stream()).closed = True

    def close(self) -> None:
        self.courier.close()
        self.sock.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    endpoint, identity, parent = args[:3]
    # Ctrl-C in the agent's terminal is the agent's to handle; a task is not torn mid-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(parent))
    worker = Worker(endpoint, identity.encode(), int(parent), chunk="--chunk" in args[3:])
    try:
        worker.run()
    finally:
        worker.close()


if __name__ == "__main__":
    main()
