"""The producer API: ``zpar.Client``.

User threads pickle their tasks and hand them to one I/O thread through a
deque and a wake-up pipe; only that thread touches the ZeroMQ socket. It
batches whatever piled up into SUBMIT messages, and resolves futures as
RESULT batches come back.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import itertools
import logging
import os
import queue
import socket
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

import zmq

from . import protocol as P
from . import serialize
from .errors import BrokerUnavailable, ConfigError, ProtocolError, SerializationError, WorkerLost
from .futures import Future
from .local import EmbeddedCluster

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 10_000


class Client:
    """Runs functions on a zpar cluster.

    ``Client()`` starts a private cluster on this machine (one worker per
    core, or ``workers``) and stops it on ``close()``, at the end of a
    ``with`` block, or at exit. ``Client("tcp://host:5555")`` connects to a
    running ``zpar-broker``.

    ``window`` bounds the tasks in flight: ``submit`` blocks past it, so a
    fast producer cannot fill memory. Raises BrokerUnavailable when no broker
    answers within ``connect_timeout`` seconds.
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None,
                 window: int = DEFAULT_WINDOW, connect_timeout: float = 10.0) -> None:
        if window < 1:
            raise ConfigError(f"window must be at least 1, not {window}")
        self._cluster: EmbeddedCluster | None = None
        if address is None:
            self._cluster = EmbeddedCluster(workers)
            address = self._cluster.frontend
        elif workers is not None:
            raise ConfigError("workers= sets the size of the embedded cluster; a remote cluster's "
                              "size is set by its agents (zpar-agent --workers N)")
        self.address = address
        self._window = threading.Semaphore(window)
        self._window_size = window
        self._funcs = serialize.FunctionCache()
        self._funcs_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._submits: collections.deque[tuple] = collections.deque()
        self._cancels: collections.deque[int] = collections.deque()
        self._closed = False
        self._io = _IOThread(self, address)
        self._wake = self._io.wake
        self._io.start()
        if not self._io.welcomed.wait(connect_timeout) or self._io.failure is not None:
            failure = self._io.failure
            self.close()
            if failure is not None:
                raise failure
            hint = ("the embedded cluster did not start" if self._cluster else
                    "is `zpar-broker` running there, and is this its frontend address?")
            raise BrokerUnavailable(f"no zpar broker answered at {address} within {connect_timeout:g} s; {hint}")
        _live_clients.add(self)

    # ------------------------------------------------------------------ submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; returns its Future.

        Raises SerializationError (a TypeError) naming the function or argument
        that cannot be pickled, before anything is sent.
        """
        return self._submit(fn, (args, kwargs), 0)

    def _submit(self, fn: Callable[..., Any], payload: Any, flags: int) -> Future:
        if self._closed:
            raise RuntimeError("this zpar Client is closed; create a new one")
        with self._funcs_lock:
            digest, blob = self._funcs.get(fn)
        nframes, data, frames = P.pack_payload(
            serialize.dumps(payload, what=f"arguments of {getattr(fn, '__qualname__', fn)!r}"))
        if threading.get_ident() != self._io.ident:  # back-pressure; never block the I/O thread itself
            while not self._window.acquire(timeout=1.0):
                if not self._io.is_alive():
                    raise RuntimeError("this zpar Client's connection has stopped; create a new one")
        tid = next(self._ids)
        fut = Future(tid, self._cancel_one)
        self._submits.append((tid, digest, blob, nframes, data, frames, flags, fut))
        self._wake()
        return fut

    def _cancel_one(self, fut: Future) -> None:
        self._cancels.append(fut.task_id)
        self._wake()

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int | None = None,
            timeout: float | None = None) -> Iterator[Any]:
        """``fn`` over the zipped iterables; yields results in input order.

        Input is consumed lazily, a bounded window ahead of the results, so a
        generator of any length works in bounded memory. ``chunksize`` items
        travel as one task. Raises TimeoutError if a result is not in by
        ``timeout`` seconds after the call, and the task's own exception if
        one raised. Leaving the loop early cancels what is still pending.
        """
        return self._ordered(fn, iterables, chunksize, timeout)

    imap = map

    def imap_unordered(self, fn: Callable[..., Any], *iterables: Iterable[Any],
                       chunksize: int | None = None, timeout: float | None = None) -> Iterator[Any]:
        """Like ``map``, but yields each result as soon as it is in."""
        return self._unordered(fn, iterables, chunksize, timeout)

    @staticmethod
    def as_completed(futures: Iterable[concurrent.futures.Future], timeout: float | None = None,
                     ) -> Iterator[concurrent.futures.Future]:
        """Yields the futures as they complete (``concurrent.futures.as_completed``)."""
        return concurrent.futures.as_completed(futures, timeout)

    @staticmethod
    def gather(futures: Iterable[concurrent.futures.Future], timeout: float | None = None) -> list[Any]:
        """The results of ``futures`` in order; raises the first task error met."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]

    # ------------------------------------------------------------------ map helpers

    def _task_stream(self, fn, iterables, chunksize) -> Iterator[tuple[Any, int]]:
        args = zip(*iterables)
        if not chunksize or chunksize <= 1:
            return (((a, {}), 0) for a in args)
        chunks = iter(lambda: list(itertools.islice(args, chunksize)), [])
        return ((chunk, P.FLAG_CHUNK) for chunk in chunks)

    def _ordered(self, fn, iterables, chunksize, timeout) -> Iterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._task_stream(fn, iterables, chunksize)
        pending: collections.deque[tuple[Future, int]] = collections.deque()

        def fill() -> None:
            while len(pending) < self._window_size:
                item = next(stream, None)
                if item is None:
                    return
                pending.append((self._submit(fn, item[0], item[1]), item[1]))

        fill()  # start now, as Executor.map does

        def results() -> Iterator[Any]:
            try:
                while pending:
                    fut, flags = pending[0]
                    left = None if deadline is None else deadline - time.monotonic()
                    value = fut.result(left)
                    pending.popleft()
                    fill()
                    if flags & P.FLAG_CHUNK:
                        yield from value
                    else:
                        yield value
            finally:
                for fut, _ in pending:
                    fut.cancel()

        return results()

    def _unordered(self, fn, iterables, chunksize, timeout) -> Iterator[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._task_stream(fn, iterables, chunksize)
        done: queue.SimpleQueue[tuple[Future, int]] = queue.SimpleQueue()
        pending: set[Future] = set()

        def fill() -> None:
            while len(pending) < self._window_size:
                item = next(stream, None)
                if item is None:
                    return
                fut = self._submit(fn, item[0], item[1])
                pending.add(fut)
                flags: int = item[1]
                fut.add_done_callback(lambda f, flags=flags: done.put((f, flags)))  # type: ignore[misc]

        fill()

        def results() -> Iterator[Any]:
            try:
                while pending:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    try:
                        fut, flags = done.get(timeout=left)
                    except queue.Empty:
                        raise TimeoutError(f"{len(pending)} results not in within the timeout") from None
                    pending.discard(fut)
                    fill()
                    value = fut.result()
                    if flags & P.FLAG_CHUNK:
                        yield from value
                    else:
                        yield value
            finally:
                for fut in pending:
                    fut.cancel()

        return results()

    # ------------------------------------------------------------------ lifetime

    def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> int:
        """Block until the cluster has at least ``n`` workers; returns how many it has.

        Raises TimeoutError naming what is missing if they do not come in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            workers = self.status(max(0.1, deadline - time.monotonic()))["workers"]
            if workers >= n:
                return workers
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the cluster at {self.address} has {workers} workers, not {n}, after "
                                   f"{timeout:g} s; are its agents running (zpar-agent --broker ...)?")
            time.sleep(0.02)  # polling the broker's status; nothing to wake us sooner

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The broker's view: nodes, workers busy and idle, queued, running, done."""
        return broker_status(self.address, timeout)

    def close(self) -> None:
        """Cancel what is pending, disconnect, and stop the embedded cluster if any."""
        if self._closed:
            return
        self._closed = True
        _live_clients.discard(self)
        self._io.stop()
        if self._cluster is not None:
            self._cluster.stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "embedded" if self._cluster else self.address
        return f"<zpar.Client {kind}{' closed' if self._closed else ''}>"


_live_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for client in list(_live_clients):
        client.close()


def broker_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the broker at ``address`` (its frontend) for its status."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(P.encode(P.StatusMsg()))
        if not sock.poll(timeout * 1000):
            raise BrokerUnavailable(f"no zpar broker answered at {address} within {timeout:g} s; "
                                    "is `zpar-broker` running, and is this its frontend address?")
        frames = sock.recv_multipart()
        msg = P.decode(frames[0], len(frames) - 1)
        if not isinstance(msg, P.StatusMsg):
            raise ProtocolError(f"expected STATUS from the broker, got {msg.kind.name}")
        return msg.info
    finally:
        sock.close()


class _IOThread(threading.Thread):
    """Owns the client's socket: sends SUBMIT/CANCEL, receives RESULT."""

    def __init__(self, client: Client, address: str) -> None:
        super().__init__(name="zpar-client-io", daemon=True)
        self.client = client
        self.address = address
        self.welcomed = threading.Event()
        self.failure: BaseException | None = None
        self.pending: dict[int, Future] = {}
        self.sent_funcs: set[bytes] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._stopping = False
        self._done = False  # the loop has ended: wake() must not write any more

    def wake(self) -> None:
        """Called from any thread; at most one byte in the pipe per wake-up."""
        if not self._woken and not self._done:
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass

    def stop(self) -> None:
        self._stopping = True
        if not self._done:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass
        if self.is_alive() and threading.current_thread() is not self:
            self.join(10)

    def run(self) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 20)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock = sock
        try:
            sock.connect(self.address)
            sock.send(P.encode(P.Hello(P.Role.PRODUCER, f"client-{os.getpid()}", socket.gethostname(), os.getpid())))
            self._loop()
        except BaseException as exc:  # surface it to the user's threads, never die silently
            log.exception("zpar client I/O thread failed")
            self.failure = exc
            self.welcomed.set()
        finally:
            self._fail_pending()
            try:
                sock.send(P.encode(P.Bye("client closing")), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            sock.close()
            self._done = True

    def __del__(self) -> None:
        # Closed only here, once nothing can call wake(): a closed fd number may be reused.
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
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
            if self.sock in events:
                self._receive()
            self._send_cancels()
            self._send_submits()

    # ------------------------------------------------------------------ outgoing

    def _send_submits(self) -> None:
        submits = self.client._submits
        while submits:
            entries: list[P.TaskEntry] = []
            funcs: list[bytes] = []
            blobs: list[Any] = []
            frames: list[Any] = []
            nbytes = 0
            while submits and len(entries) < P.BATCH_MAX_TASKS and nbytes < P.BATCH_MAX_BYTES:
                tid, digest, blob, nframes, data, tframes, flags, fut = submits.popleft()
                if fut.done():  # cancelled before it left
                    self.client._window.release()
                    continue
                if digest not in self.sent_funcs:
                    self.sent_funcs.add(digest)
                    funcs.append(digest)
                    blobs.append(blob)
                entries.append(P.TaskEntry(tid, digest, nframes, flags, data))
                if nframes:
                    frames.extend(tframes)
                    nbytes += sum(len(f) for f in tframes)
                else:
                    nbytes += len(data)
                self.pending[tid] = fut
            if entries:
                self.sock.send_multipart([P.encode(P.Submit(tuple(entries), tuple(funcs))), *blobs, *frames],
                                         copy=False)

    def _send_cancels(self) -> None:
        cancels = self.client._cancels
        ids = []
        while cancels:
            tid = cancels.popleft()
            if self.pending.pop(tid, None) is not None:
                self.client._window.release()
                ids.append(tid)
        if ids:
            self.sock.send(P.encode(P.Cancel(tuple(ids))))

    # ------------------------------------------------------------------ incoming

    def _receive(self) -> None:
        for _ in range(256):
            if not self.sock.get(zmq.EVENTS) & zmq.POLLIN:
                return
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                msg = P.decode(frames[0].buffer, len(frames) - 1)
            except ProtocolError as exc:
                log.error("dropped a bad message from the broker at %s: %s", self.address, exc)
                continue
            if isinstance(msg, P.Result):
                self._results(msg, frames[1:])
            elif isinstance(msg, P.Welcome):
                self.welcomed.set()
            elif isinstance(msg, P.Error):
                self._error(msg)

    def _results(self, msg: P.Result, frames: list[Any]) -> None:
        pos = 0
        release = self.client._window.release
        for entry in msg.results:
            rframes, pos = P.unpack_payload(entry, frames, pos)
            fut = self.pending.pop(entry.id, None)
            if fut is None:
                continue  # cancelled, or a duplicate
            release()
            try:
                if entry.status == P.Status.OK:
                    fut.set_result(serialize.loads(rframes, what=f"result of task {entry.id}"))
                elif entry.status == P.Status.RAISED:
                    fut.set_exception(serialize.load_exception(rframes))
                else:
                    fut.set_exception(WorkerLost(bytes(rframes[0]).decode(errors="replace")))
            except SerializationError as exc:
                fut.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled by the user meanwhile

    def _error(self, msg: P.Error) -> None:
        log.error("broker at %s refused: %s", self.address, msg.message)
        for tid in msg.ids:
            fut = self.pending.pop(tid, None)
            if fut is not None:
                self.client._window.release()
                try:
                    fut.set_exception(ProtocolError(f"the broker refused task {tid}: {msg.message}"))
                except concurrent.futures.InvalidStateError:
                    pass

    def _fail_pending(self) -> None:
        """On close: every future still open is cancelled, so nothing waits forever."""
        leftovers = list(self.pending.values())
        self.pending.clear()
        while self.client._submits:
            leftovers.append(self.client._submits.popleft()[-1])
        for fut in leftovers:
            fut._on_cancel = None
            fut.cancel()
