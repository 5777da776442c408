"""The producer's I/O shell: the one thread that owns the socket to the broker.

Every rule lives in zpar._producer.ProducerCore; this thread only moves
bytes and fires timers::

    user threads ──(submits, cancels, feeds: deques + a wake-up pipe)──▶ Connection thread
                                                                          │ core.submitted / cancelled / fed
    broker ──frames──▶ Reader ──P.decode──▶ core.received ──messages──▶ P.encode ──▶ DEALER ──▶ broker
                                            core.tick at core.next_deadline() (the poll's timeout)

It also watches the CurveZMQ handshake (a refusal is an AuthenticationError,
not a hang). The deques, the wake-up and the ``welcomed`` event are all the
state it shares with other threads; the core is touched by this thread only.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import zmq

from . import protocol as P
from . import security
from ._loop import DRAIN, Reader
from ._pending import PendingTask
from ._producer import ProducerCore
from .errors import ProtocolError
from .futures import Future
from .streaming import FeedOp

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Connection(threading.Thread):
    """The client's I/O thread: ``wake()`` after appending to ``submits``, ``cancels`` or ``feeds``.

    ``welcomed`` is set at the first WELCOME, or when the thread fails
    (``failure`` says why). ``finished`` is True once nothing queued is sent
    any more; ``abandon`` fails a task queued too late.
    """

    def __init__(self, address: str, submits: collections.deque[PendingTask],
                 cancels: collections.deque[tuple[int, bool]], release: Callable[[], None], broker_timeout: float,
                 creds: security.Credentials | None = None, shared: bool = False) -> None:
        super().__init__(name="zpar-client-io", daemon=True)
        self.address = address
        self.creds = creds
        self.submits, self.cancels = submits, cancels
        self.feeds: collections.deque[FeedOp] = collections.deque()  # from streams: objects, credits, closes
        self.releases: collections.deque[bytes] = collections.deque()  # scattered objects no Ref holds (zpar._refs)
        hello = P.Hello(P.Role.PRODUCER, f"client-{os.getpid()}", socket.gethostname(), os.getpid())
        self.core = ProducerCore(address, release, broker_timeout, hello, shared)
        self.welcomed = threading.Event()  # the first WELCOME
        self._monitor: security.HandshakeMonitor | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._stopping = False
        self.finished = False  # the loop is ending: nothing queued from now on is sent, no wake-up written

    @property
    def failure(self) -> BaseException | None:
        """Why the connection ended, if it failed (refused, revoked, or this thread crashed)."""
        return self.core.failure

    # ------------------------------------------------------------------ other threads

    def wake(self) -> None:
        """Called from any thread; at most one byte in the pipe per wake-up."""
        if not self._woken and not self.finished:
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass

    def cancel(self, fut: Future, force: bool = False) -> None:
        """A future's cancel, for this thread (each Future's ``on_cancel``)."""
        self.cancels.append((fut.task_id, force))
        self.wake()

    def release(self, digest: bytes) -> None:
        """No Ref holds ``digest`` any more (any thread, even the garbage collector's): tell the broker."""
        self.releases.append(digest)
        self.wake()

    def feed(self, op: FeedOp) -> None:
        """A stream's objects, credits and closes, for this thread (each Future's ``on_feed``: zpar.streaming)."""
        self.feeds.append(op)
        self.wake()

    def stop(self) -> None:
        self._stopping = True
        if not self.finished:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass
        if self.is_alive() and threading.current_thread() is not self:
            self.join(10)

    def abandon(self, task: PendingTask) -> None:
        """A task queued after the loop ended: fail it (with why the loop ended), if the sweep missed it."""
        try:
            self.submits.remove(task)
        except ValueError:
            return  # the last sweep took it
        self.core.release()
        task.future.set_exception(self.failure or RuntimeError(
            "this zpar Client's connection has stopped; create a new one"))

    def __del__(self) -> None:
        # Closed only here, once nothing can call wake(): a closed fd number may be reused.
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        # Over ipc (the embedded cluster, starting as we connect) a failed try costs two system calls: keep
        # trying every 5 ms, not after doubling waits, which made Client() wait up to 0.3 s more than the hub.
        ipc = self.address.startswith("ipc://")
        sock.setsockopt(zmq.RECONNECT_IVL, 5 if ipc else 20)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5 if ipc else 1000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_SIZE)
        self.sock = sock
        self._reader = Reader(sock, None, log, max_frames=P.MAX_FRAMES + 1,
                              on_oversized=lambda: log.error("dropped a message of more than %d frames from "
                                                             "the broker at %s", P.MAX_FRAMES, self.address))
        security.apply_client(sock, self.creds)
        if self.address.startswith("tcp://"):  # a refused handshake must be an error, not a hang
            self._monitor = security.HandshakeMonitor(sock, self.address, security.origin(self.creds))
        try:
            sock.connect(self.address)
            self._send(self.core.start(time.monotonic()))
            self._loop()
        except BaseException as exc:  # surface it to the user's threads, never die silently
            log.exception("zpar client I/O thread failed")
            self.core.crashed(exc)
        finally:
            self.finished = True  # before the last sweep: a submit after it sees the flag (Client._submit)
            if self.core.failure is not None:
                self.welcomed.set()  # Client() waits no longer: failure says why
            for msg in self.core.closing(_drain(self.submits)):
                try:
                    sock.send_multipart(P.encode(msg), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            if self._monitor is not None:
                self._monitor.close()
            sock.close()

    def _loop(self) -> None:
        core = self.core
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor.socket, zmq.POLLIN)
        while True:
            timeout = max(0.0, core.next_deadline() - time.monotonic())
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
            if self._monitor is not None and self._monitor.socket in events:
                refusal = self._monitor.check()
                if refusal is not None:
                    core.refused(refusal)
                    return
            if self.sock in events:
                self._receive()
            # Feeds taken before submits: a task's SUBMIT goes ahead of what is sent to it.
            cancels, feeds, submits = _drain(self.cancels), _drain(self.feeds), _drain(self.submits)
            self._send(core.handed_over(cancels, submits, feeds))
            if self.releases:  # after the SUBMITs that use them
                self._send(core.released(_drain(self.releases)))
            self._send(core.tick(time.monotonic()))
            if core.ended:
                return
            if core.epoch is not None:
                self.welcomed.set()

    def _receive(self) -> None:
        for _ in range(DRAIN):
            frames = self._reader.next()  # bounded in parts, as every socket of ours
            if frames is None:
                return
            now = time.monotonic()
            try:
                msg = P.decode(frames)
            except ProtocolError as exc:
                log.error("dropped a bad message from the broker at %s: %s", self.address, exc)
                self.core.heard(now)
                continue
            self._send(self.core.received(now, msg))
            if self.core.ended:
                return

    def _send(self, messages: list[P.Message]) -> None:
        for msg in messages:
            self.sock.send_multipart(P.encode(msg), copy=False)


def _drain(queue: collections.deque[_T]) -> list[_T]:
    """What other threads have appended so far, oldest first."""
    out: list[_T] = []
    while queue:
        out.append(queue.popleft())
    return out
