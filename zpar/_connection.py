"""The producer's connection to its broker: the one I/O thread that owns the socket.

User threads hand it work through two deques and a wake-up pipe; it sends
SUBMIT and CANCEL, heartbeats, resolves futures as RESULT batches arrive, and
keeps every unfinished task (with its payload) so that nothing is lost when
the broker restarts::

    connected ──(broker silent for liveness x heartbeat, BYE, or "send HELLO")──▶ reconnecting
        ▲                                                                              │
        └──── WELCOME: every unfinished task is sent again (the broker deduplicates) ◀─┘
                       reconnecting for longer than broker_timeout: BrokenCluster
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

import zmq

from . import protocol as P
from . import security, serialize
from ._loop import Reader
from .errors import (
    AuthenticationError,
    BrokenCluster,
    MemoryLimitExceeded,
    ProtocolError,
    SerializationError,
    TaskTimeout,
    WorkerLost,
)
from .futures import Future
from .options import TaskOptions
from .streaming import FeedOp

log = logging.getLogger(__name__)


class PendingTask:
    """A task the producer has not seen finish; kept whole (its entry, payload attached) so it can be sent again."""

    __slots__ = ("blob", "entry", "future", "id", "opts", "reruns")

    def __init__(self, entry: P.TaskEntry, blob: bytes, opts: TaskOptions, future: Future) -> None:
        self.id, self.entry, self.blob = entry.id, entry, blob
        self.opts, self.future = opts, future
        self.reruns = 0  # runs asked again because the task raised one of opts.retry_on


class Connection(threading.Thread):
    def __init__(self, address: str, submits: collections.deque[PendingTask], cancels: collections.deque,
                 release: Callable[[], None], broker_timeout: float,
                 creds: security.Credentials | None = None) -> None:
        super().__init__(name="zpar-client-io", daemon=True)
        self.address = address
        self.creds = creds
        self._monitor: security.HandshakeMonitor | None = None
        self.submits, self.cancels, self.release = submits, cancels, release
        self.broker_timeout = broker_timeout
        self.welcomed = threading.Event()  # the first WELCOME
        self.failure: BaseException | None = None
        self.pending: dict[int, PendingTask] = {}
        self.feeds: collections.deque[FeedOp] = collections.deque()  # from streams: objects, credits, closes
        self.shipped = P.Shipped()  # the function blobs the broker has from us
        self.epoch: str | None = None
        self.heartbeat, self.liveness = 1.0, 3
        self.connected = False
        self._lost_since = time.monotonic()  # when we last knew the broker was there
        self._last_heard = time.monotonic()
        self._next_beat = time.monotonic()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._stopping = False
        self.finished = False  # the loop is ending: nothing queued from now on is sent, no wake-up written

    # ------------------------------------------------------------------ other threads

    def wake(self) -> None:
        """Called from any thread; at most one byte in the pipe per wake-up."""
        if not self._woken and not self.finished:
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass

    def stop(self) -> None:
        self._stopping = True
        if not self.finished:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass
        if self.is_alive() and threading.current_thread() is not self:
            self.join(10)

    def __del__(self) -> None:
        # Closed only here, once nothing can call wake(): a closed fd number may be reused.
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 20)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_SIZE)
        self.sock = sock
        self._reader = Reader(sock, None, log, max_frames=P.MAX_FRAMES + 1,
                              on_oversized=lambda: log.error("dropped a message of more than %d frames from "
                                                             "the broker at %s", P.MAX_FRAMES, self.address))
        security.apply_client(sock, self.creds)
        if self.address.startswith("tcp://"):  # a refused handshake must be an error, not a hang
            self._monitor = security.HandshakeMonitor(sock, self.address, self.creds)
        try:
            sock.connect(self.address)
            self._hello()
            self._loop()
        except BaseException as exc:  # surface it to the user's threads, never die silently
            log.exception("zpar client I/O thread failed")
            self.failure = exc
            self.welcomed.set()
        finally:
            self.finished = True  # before the last sweep: a submit after it sees the flag (Client._submit)
            self._cancel_all()
            try:
                sock.send_multipart(P.encode(P.Bye(P.ByeReason.LEAVING)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            if self._monitor is not None:
                self._monitor.close()
            sock.close()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor.socket, zmq.POLLIN)
        while True:
            timeout = max(0.0, self._next_beat - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000) + 1))
            if self._wake_r in events:
                # Empty the pipe, then clear the flag, then take the queues: a wake()
                # after the read writes again, and one before it finds its task queued.
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                self._woken = False
            if self._stopping:
                return  # close(): what was not sent is cancelled, not sent now
            if self._monitor is not None and self._monitor.socket in events and self._refused():
                return
            if self.sock in events:
                self._receive()
            self._send_cancels()
            self._take_submits()
            if self.feeds:
                self._send_feeds()
            now = time.monotonic()
            if now >= self._next_beat:
                self._timers(now)

    def _timers(self, now: float) -> None:
        self._next_beat = now + self.heartbeat
        # Twice the broker's own liveness rule: a busy broker, or our thread starved of the
        # GIL by the user's code, must not make us resend everything.
        if self.connected and now - self._last_heard > 2 * self.heartbeat * self.liveness:
            log.warning("the broker at %s has been silent for %.1f s; reconnecting", self.address,
                        now - self._last_heard)
            self._lose(self._last_heard)
        if self.connected:
            self._send(P.Heartbeat())
            return
        self._hello()  # again, until a broker answers
        if now - self._lost_since > self.broker_timeout and self.pending:
            self._fail_all(BrokenCluster(  # a BrokerUnavailable; also what Executor users catch
                f"the broker at {self.address} has not answered for {now - self._lost_since:.0f} s "
                f"(broker_timeout={self.broker_timeout:g} s); is `zpar-broker` running there?"))

    def _refused(self) -> bool:
        """True (and every pending future failed) when the broker refused our handshake."""
        assert self._monitor is not None  # noqa: S101 - only called with one
        failure = self._monitor.check()
        if failure is None:
            return False
        exc = AuthenticationError(failure)
        log.info("%s", failure)  # raised to the user, from Client() or from every pending future
        self.failure = exc
        self._fail_all(exc)
        self.welcomed.set()
        return True

    def _hello(self) -> None:
        self._send(P.Hello(P.Role.PRODUCER, f"client-{os.getpid()}", socket.gethostname(), os.getpid()))

    def _lose(self, since: float) -> None:
        self.connected = False
        self._lost_since = since

    def _send(self, msg: P.Message) -> None:
        self.sock.send_multipart(P.encode(msg), copy=False)

    # ------------------------------------------------------------------ outgoing

    def _take_submits(self) -> None:
        """Move new tasks into the pending table and send them, if connected."""
        batch: list[PendingTask] = []
        while self.submits:
            task = self.submits.popleft()
            if task.future.done():  # cancelled before it left
                self.release()
                continue
            self.pending[task.id] = task
            batch.append(task)
        if self.connected and batch:
            self._send_tasks(batch)

    def _send_tasks(self, tasks: list[PendingTask]) -> None:
        """SUBMIT in batches that fit a message, each function blob once per connection."""
        entries = [task.entry for task in tasks]
        blobs = {task.entry.digest: task.blob for task in tasks}
        # A blob for every task at worst: keep room for them in each message.
        for batch in P.batches(entries, reserved_frames=min(len(blobs), P.BATCH_MAX_TASKS)):
            self._send(P.Submit(tuple(batch), self.shipped.functions(batch, blobs.__getitem__)))

    def _send_cancels(self) -> None:
        ids: list[int] = []
        forced: list[int] = []
        while self.cancels:
            tid, force = self.cancels.popleft()
            if self.pending.pop(tid, None) is not None:
                self.release()
                (forced if force else ids).append(tid)
        if self.connected:
            for group, force in ((ids, False), (forced, True)):
                if group:
                    self._send(P.Cancel(tuple(group), force))

    # ------------------------------------------------------------------ incoming

    def _receive(self) -> None:
        for _ in range(256):
            frames = self._reader.next()  # bounded in parts, as every socket of ours
            if frames is None:
                return
            self._last_heard = time.monotonic()
            try:
                msg = P.decode(frames)
            except ProtocolError as exc:
                log.error("dropped a bad message from the broker at %s: %s", self.address, exc)
                continue
            if isinstance(msg, P.Result):
                self._results(msg)
            elif isinstance(msg, P.Items):
                self._items(msg)
            elif isinstance(msg, P.Welcome):
                self._welcome(msg)
            elif isinstance(msg, P.Error):
                self._error(msg)
            elif isinstance(msg, P.Bye):
                log.warning("the broker at %s is stopping (%s); waiting for it to return", self.address,
                            msg.reason.name.lower())
                self._lose(time.monotonic())

    def _welcome(self, msg: P.Welcome) -> None:
        if self.connected and msg.epoch == self.epoch:
            return  # an answer to a HELLO queued while the broker was away: we are already back
        first = self.epoch is None
        restarted = not first and msg.epoch != self.epoch
        self.epoch, self.heartbeat, self.liveness = msg.epoch, msg.heartbeat, msg.liveness
        self.connected = True
        self._next_beat = min(self._next_beat, time.monotonic() + self.heartbeat)
        self.welcomed.set()
        if first:
            return
        # A new broker, or the same one that forgot us: send everything unfinished again.
        # Results already on their way are deduplicated here; tasks it still has, there.
        log.warning("%s broker at %s; sending its %d unfinished tasks again",
                    "a restarted" if restarted else "reconnected to the", self.address, len(self.pending))
        self.shipped.forget()
        self._fail_streams()
        if self.pending:
            self._send_tasks(list(self.pending.values()))

    def _results(self, msg: P.Result) -> None:
        for entry in msg.results:
            task = self.pending.pop(entry.id, None)
            if task is None:
                continue  # cancelled, or a duplicate after a resubmission
            fut = task.future
            try:
                if entry.status == P.Status.OK:
                    value = serialize.loads(entry.payload, what=functools.partial("result of task {}".format, entry.id))
                    self.release()
                    fut.set_result(value)
                    continue
                if entry.status == P.Status.STREAMED:
                    self.release()
                    self._stream_ended(task, entry.payload)
                    continue
                if entry.status == P.Status.RAISED:
                    exc: BaseException = serialize.load_exception(entry.payload)
                    if (isinstance(exc, task.opts.retry_on) and task.reruns < task.opts.retries
                            and not _exchanged(fut)):
                        task.reruns += 1
                        log.info("task %d raised %s; running it again (%d of %d)", task.id,
                                 type(exc).__name__, task.reruns, task.opts.retries)
                        self.pending[task.id] = task
                        self._send_tasks([task])
                        continue
                else:
                    exc = _ended_without_value(entry)
                self.release()
                fut.set_exception(exc)
            except SerializationError as err:
                self.release()
                fut.set_exception(err)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled by the user meanwhile

    # ------------------------------------------------------------------ streams (zpar.streaming)

    def _items(self, msg: P.Items) -> None:
        for entry in msg.items:
            task = self.pending.get(entry.id)
            if task is None:
                continue  # cancelled, failed, or done
            if task.future._stream_state().arrived(entry.seq, entry.payload) is not None:
                self._stream_broken(task, f"item {task.future._stream_state().next_seq} of task {task.id} "
                                          "was lost on the way (a connection broke)")
        for credit in msg.credits:
            task = self.pending.get(credit.id)
            if task is not None:
                task.future._stream_state().granted(credit.upto)

    def _stream_ended(self, task: PendingTask, rframes: P.Payload) -> None:
        """A task that sent items returned: its result, once every item it counted is here."""
        fut = task.future
        try:
            count, value = serialize.loads(rframes, what=lambda: f"result of task {task.id}")
        except SerializationError as err:
            fut.set_exception(err)
            return
        arrived = fut._stream.next_seq if fut._stream is not None else 0
        if arrived < count:
            fut.set_exception(WorkerLost(f"{count - arrived} of the {count} items task {task.id} sent were lost "
                                         "on the way (a connection broke)"))
        else:
            fut.set_result(value)

    def _stream_broken(self, task: PendingTask, reason: str) -> None:
        """Fail a stream that cannot go on, and stop its task."""
        self.pending.pop(task.id, None)
        self.release()
        if self.connected:
            self._send(P.Cancel((task.id,), True))
        try:
            task.future.set_exception(WorkerLost(reason))
        except concurrent.futures.InvalidStateError:
            pass

    def _fail_streams(self) -> None:
        """After the broker lost track of us: a task that exchanged items cannot be sent again."""
        for task in [t for t in self.pending.values() if _exchanged(t.future)]:
            self._stream_broken(task, f"the broker at {self.address} lost track of task {task.id} in the middle "
                                      "of its stream; a task that has exchanged items is not run again")

    def _send_feeds(self) -> None:
        """FEED what streams handed us: objects for tasks, credits, closed inputs, in order."""
        ops: list[FeedOp] = []
        while self.feeds:
            ops.append(self.feeds.popleft())
        self._take_submits()  # a task's SUBMIT goes ahead of what is sent to it
        if not self.connected:
            return  # those streams exchanged items: they fail when the broker is back
        items: list[P.ItemEntry] = []
        credits: list[P.Credit] = []
        closed: list[int] = []
        nframes = nbytes = 0
        for op in ops:
            if op[1] not in self.pending:
                continue
            if op[0] == "item":
                _, tid, seq, oframes = op
                items.append(P.ItemEntry(tid, seq, oframes))
                nframes += len(oframes)
                nbytes += P.payload_bytes(oframes)
            elif op[0] == "credit":
                credits.append(P.Credit(op[1], op[2]))
            else:
                closed.append(op[1])
            if (len(items) + len(credits) + len(closed) >= P.BATCH_MAX_TASKS or nbytes >= P.BATCH_MAX_BYTES
                    or nframes + P.MAX_TASK_FRAMES >= P.MAX_FRAMES):
                self._send(P.Feed(tuple(items), tuple(credits), tuple(closed)))
                items, credits, closed, nframes, nbytes = [], [], [], 0, 0
        if items or credits or closed:
            self._send(P.Feed(tuple(items), tuple(credits), tuple(closed)))

    def _error(self, msg: P.Error) -> None:
        if msg.code is P.ErrorCode.UNKNOWN_PEER:  # the broker does not know us (any more)
            self._lose(time.monotonic())
            self._hello()
            return
        if msg.code is P.ErrorCode.UNKNOWN_FUNCTION:  # it lost a function blob: send those tasks with it
            retry = [self.pending[tid] for tid in msg.ids if tid in self.pending]
            self.shipped.forget(task.entry.digest for task in retry)
            if retry:
                self._send_tasks(retry)
            return
        if msg.code is P.ErrorCode.KEY_REVOKED:  # for good: fail what is pending, stop
            exc = AuthenticationError(f"the broker at {self.address} cut us off: this producer's key was "
                                      "removed from the broker's allow-list")
            self.failure = exc
            self._fail_all(exc)
            self._stopping = True
            return
        detail = f"{msg.code.name}{': ' + msg.detail if msg.detail else ''}"
        log.error("broker at %s refused a message (%s)", self.address, detail)
        for tid in msg.ids:
            refused = self.pending.pop(tid, None)
            if refused is not None:
                self.release()
                try:
                    refused.future.set_exception(ProtocolError(f"the broker refused task {tid} ({detail})"))
                except concurrent.futures.InvalidStateError:
                    pass

    # ------------------------------------------------------------------ endings

    def _fail_all(self, exc: BaseException) -> None:
        tasks = list(self.pending.values())
        self.pending.clear()
        for task in tasks:
            self.release()
            try:
                task.future.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass

    def abandon(self, task: PendingTask) -> None:
        """A task queued after the loop ended: fail it (with why the loop ended), if the sweep missed it."""
        try:
            self.submits.remove(task)
        except ValueError:
            return  # the last sweep took it
        self.release()
        task.future.set_exception(self.failure or RuntimeError(
            "this zpar Client's connection has stopped; create a new one"))

    def _cancel_all(self) -> None:
        """On close: every future still open is cancelled (or failed, if the loop failed), so nothing waits forever."""
        leftovers = [t.future for t in self.pending.values()]
        self.pending.clear()
        while self.submits:
            leftovers.append(self.submits.popleft().future)
        if self.failure is not None:
            for fut in leftovers:
                try:
                    fut.set_exception(self.failure)
                except concurrent.futures.InvalidStateError:
                    pass
            return
        for fut in leftovers:
            fut._on_cancel = None
            fut.cancel()


def _exchanged(fut: Future) -> bool:
    """The task has sent or been sent an item: running it again could repeat or lose one."""
    return fut._stream is not None and fut._stream.exchanged


def _ended_without_value(entry: P.ResultEntry) -> BaseException:
    """The error for a task that ended without a value (LOST, TIMEOUT, CANCELLED, MEMORY), from its cause."""
    cause = entry.cause or P.Cause()
    worker = f"worker pid {cause.pid} on {cause.node}"
    if entry.status == P.Status.TIMEOUT:
        return TaskTimeout(f"task {entry.id} {cause.detail} on {cause.node}; {worker} was stopped")
    if entry.status == P.Status.CANCELLED:
        return concurrent.futures.CancelledError(f"task {entry.id} was cancelled on {cause.node}")
    fields: dict[str, Any] = {"node": cause.node, "pid": cause.pid, "exitcode": cause.exitcode,
                              "signal": cause.signal, "attempts": cause.attempts}
    if entry.status == P.Status.MEMORY:
        return MemoryLimitExceeded(f"task {entry.id}: {worker} {cause.detail}; it was stopped", **fields)
    ended = cause.ended()
    if ended:
        text = f"task {entry.id} was lost: {worker} {ended}" + (f" ({cause.detail})" if cause.detail else "")
    else:
        text = f"task {entry.id} was lost on {cause.node or 'its node'}" + (f": {cause.detail}" if cause.detail else "")
    if cause.attempts:
        text += f"; gave up after {cause.attempts} attempt{'s' if cause.attempts != 1 else ''}"
    return WorkerLost(text, **fields)
