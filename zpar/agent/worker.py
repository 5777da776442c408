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
"""

from __future__ import annotations

import collections
import ctypes
import math
import os
import signal
import socket
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import zmq

from .. import _flow, serialize, streaming
from .. import protocol as P
from ..errors import SerializationError, TaskError
from .courier import Courier
from .spawn import RECONNECT_IVL

_PR_SET_PDEATHSIG = 1


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

    __slots__ = ("closed", "inbound", "inbox", "outbound")

    def __init__(self) -> None:
        self.outbound = _flow.SendWindow()  # our items to the producer
        self.inbound = _flow.ReceiveWindow()  # its objects to us
        self.inbox: collections.deque[P.Payload] = collections.deque()
        self.closed = False  # the producer will send nothing more


class Worker:
    def __init__(self, endpoint: str, identity: bytes, parent: int, chunk: bool = False) -> None:
        self.parent = parent
        self.chunk = chunk  # results cross an encrypted link: send large buffers in chunks
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.funcs: dict[bytes, Callable[..., Any]] = {}
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
        self.courier = Courier(self._send_results, self._give_back)
        self._bye = False  # the agent asked us to exit while a task ran
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
                self.run_batch(msg)
                self.streams.clear()
            # A FEED now is for a task that has ended: nobody will read it.

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
            entry = P.ResultEntry(task.id, status, rframes, (time.perf_counter_ns() - start) // 1000)
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
            payload = serialize.loads(task.payload, what="task arguments")
            args, kwargs = payload
            if task.flags & P.FLAG_CHANNEL:
                args = (streaming.Channel(task.id, self), *args)
            value = fn(*args, **kwargs)
            if type(value) is types.GeneratorType:
                return self._drive(task.id, value)
        except Exception as exc:  # noqa: BLE001 - whatever the task raised is its result
            return P.Status.RAISED, serialize.dump_exception(exc, self.host, self.pid)
        except BaseException as exc:  # noqa: BLE001 - sys.exit or KeyboardInterrupt inside the task
            return P.Status.RAISED, self._stand_in(exc)
        return self._result(task.id, value)

    def _stand_in(self, exc: BaseException) -> list[Any]:
        """A TaskError for sys.exit or KeyboardInterrupt: the worker goes on; ``remote_type`` names it."""
        stand_in = TaskError(f"the task raised {type(exc).__name__}{exc.args!r}; the worker kept running",
                             type(exc).__name__)
        stand_in.__cause__ = exc
        return serialize.dump_exception(stand_in, self.host, self.pid)

    def _result(self, tid: int, value: Any) -> tuple[P.Status, list[Any]]:
        stream = self.streams.get(tid) if self.streams else None
        status = P.Status.OK
        if stream is not None and stream.outbound.next_seq:  # the producer checks it got every item
            status, value = P.Status.STREAMED, (stream.outbound.next_seq, value)
        try:
            frames = serialize.dumps(value, what="result", chunk=self.chunk)
            serialize.check_payload(frames, "result")
            return status, frames
        except Exception as exc:  # noqa: BLE001 - an unpicklable or oversized result is the task's error
            return P.Status.RAISED, serialize.dump_exception(exc, self.host, self.pid)

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
            return P.Status.RAISED, serialize.dump_exception(exc, self.host, self.pid)
        except BaseException as exc:  # noqa: BLE001 - sys.exit or KeyboardInterrupt inside the generator
            return P.Status.RAISED, self._stand_in(exc)
        finally:
            gen.close()

    def _stream(self, tid: int) -> _Stream:
        # The batch's earlier results go now, ahead of this task's items, and its later tasks go back to the
        # agent: this one may run for hours.
        self.courier.streaming()
        return self.streams.setdefault(tid, _Stream())

    def send_item(self, tid: int, frames: list[Any]) -> None:
        """Send one object to the producer; blocks (reading credits) while the window is full."""
        serialize.check_payload(frames, "object sent")
        stream = self._stream(tid)
        while not stream.outbound.may_send():
            self._pump(None)
        seq = stream.outbound.sent(P.payload_bytes(frames))
        with self.courier.lock:
            self.sock.send_multipart(P.encode(P.Items((P.ItemEntry(tid, seq, frames),))), copy=False)

    def receive_item(self, tid: int, timeout: float | None) -> P.Payload:
        """The frames of the next object the producer sent; EOFError at its end, TimeoutError."""
        stream = self._stream(tid)
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = False
        while not stream.inbox:
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
                self.sock.send_multipart(P.encode(P.Items((), (P.Credit(tid, upto),))))
        return frames

    def _pump(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: for ever) for messages from the agent, and take them.

        A stream's task sent the results before it and gave back the tasks
        after it (``_stream``): the courier has nothing to send while we wait.
        """
        if not self.sock.poll(None if timeout is None else math.ceil(timeout * 1000)):
            return
        while True:
            events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]  # pyzmq: int | bytes
            if not events & zmq.POLLIN:
                return
            msg = P.decode(self.sock.recv_multipart(copy=False))
            if isinstance(msg, P.Feed):
                self._feed(msg)
            elif isinstance(msg, P.Bye):
                self._bye = True  # after this batch

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
