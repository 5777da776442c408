"""What the broker's and the agent's loops share: a wake-up, draining, signals.

A daemon object has ``stop()`` (safe from a signal handler or another
thread), ``run()`` (its poll loop) and ``close()``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from . import protocol as P

#: Messages taken from one socket before looking at the others (fairness).
DRAIN = 256
#: zmq.POLLIN as a plain int: ``int & IntFlag`` builds an enum member each time (2 us, per message).
POLLIN = int(zmq.POLLIN)


class Waker:
    """A socket pair the loop polls; ``wake()`` from anywhere makes its poll return."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        try:
            self._w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def drain(self) -> None:
        """Take the wake-ups sent so far (for a waker that signals more than once: its poll returns again
        only once something is sent after this)."""
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


#: Parts of an oversized message skipped per turn of the loop; the other sockets
#: are served in between, so a 200,000-part message does not stall them.
SKIP_SLICE = 20_000


class Reader:
    """Reads one socket for a loop: up to DRAIN messages a turn, each handed to ``handler``.

    A message of more than ``max_frames`` parts (protocol.MAX_FRAMES plus
    envelope) is dropped: its extra parts are read and let go, SKIP_SLICE
    parts a turn (ZeroMQ has no way to bound parts
    per message, nor to drop one unread). ``on_oversized`` is called once it
    is gone. A handler that raises is logged and the message dropped.
    """

    def __init__(self, sock: zmq.Socket[bytes], handler: Callable[[list[zmq.Frame]], Any] | None,
                 log: logging.Logger, *, max_frames: int = P.MAX_FRAMES + 2, on_error: Callable[[], None] | None = None,
                 on_oversized: Callable[[], None] | None = None) -> None:
        self.sock, self.handler, self.log, self.max_frames = sock, handler, log, max_frames
        self.on_error, self.on_oversized = on_error, on_oversized
        self._skipping = False

    def next(self) -> list[zmq.Frame] | None:
        """The next message within the limits, or None if none is ready now (or one is still being skipped)."""
        if self._skipping and not self._skip():
            return None
        sock = self.sock
        for _ in range(DRAIN):  # at most this many oversized ones skipped in one call
            events: int = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]  # pyzmq: int | bytes
            if not events & POLLIN:  # cheaper than raising zmq.Again at the end
                return None
            try:
                frames = [sock.recv(zmq.NOBLOCK, copy=False)]
            except zmq.Again:
                # With CurveZMQ and ZAP, a socket can say POLLIN before a large first message
                # on a new connection has fully arrived: it is read at the next wake-up.
                return None
            while frames[-1].more and len(frames) <= self.max_frames:
                frames.append(sock.recv(copy=False))
            if not frames[-1].more:
                return frames
            self._skipping = True  # over the limit
            del frames
            if not self._skip():
                return None
        return None

    def drain(self) -> None:
        """Hand up to DRAIN waiting messages to the handler (a Reader made without one is read with next())."""
        if self.handler is None:
            raise RuntimeError("drain() on a Reader made without a handler: read it with next()")
        for _ in range(DRAIN):
            frames = self.next()
            if frames is None:
                return
            try:
                self.handler(frames)
            except Exception:  # a bug must not take the daemon down; say so loudly
                if self.on_error is not None:
                    self.on_error()
                self.log.exception("error handling a message; dropped it")

    def _skip(self) -> bool:
        """Read on through an oversized message; True when it is behind us."""
        recv = self.sock.recv
        for _ in range(SKIP_SLICE):
            # One call a part, its frame dropped at once: 0.5 us a part, where recv_into and
            # getsockopt(RCVMORE) take 1.2 us (ZeroMQ has delivered the whole message by now).
            if not recv(copy=False).more:
                self._skipping = False
                if self.on_oversized is not None:
                    self.on_oversized()
                return True
        return False


class LoopPart(Protocol):
    """One daemon's share of a poll loop; a process may run several in one loop."""

    def start(self) -> None: ...
    def handle(self, events: dict[Any, int]) -> None: ...
    def next_deadline(self) -> float: ...
    def on_timers(self, now: float) -> bool:
        """Fire what is due; True when the process should stop."""
    def shutdown(self) -> None: ...


def run_loop(parts: list[LoopPart], poller: zmq.Poller, waker: Waker) -> None:
    """Block on one poller for every part until the waker fires or a part asks to stop."""
    for part in parts:
        part.start()
    next_trim = time.monotonic() + TRIM_EVERY
    try:
        while True:
            before = time.monotonic()
            timeout = max(0.0, min(p.next_deadline() for p in parts) - before)
            events = dict(poller.poll(int(timeout * 1000) + 1))
            if waker.fileno() in events:
                return
            for part in parts:
                part.handle(events)
            now = time.monotonic()
            stops = [part.on_timers(now) for part in parts]  # every part's timers fire, whoever asks to stop
            if any(stops):
                return
            if now >= next_trim and now - before >= TRIM_QUIET:  # at a turn taken anyway: no wake-up for it
                next_trim = now + TRIM_EVERY
                trim_heap()
    finally:
        for part in parts:
            part.shutdown()


class Daemon(Protocol):
    def stop(self) -> None: ...
    def run(self) -> None: ...
    def close(self) -> None: ...


#: glibc serves allocations of this size or more by mmap, and returns them to the OS when freed. Fixed
#: (glibc raises its threshold after each large block is freed, up to 32 MiB: after a burst of big
#: messages, later ones would stay in the heap). Not lower: a large argument crosses each hop in
#: frames of 1 MiB (serialize.CHUNK_BYTES), and CurveZMQ allocates a buffer or two for each; served
#: by mmap, every one is fresh pages to fault in (a third of a hop's CPU, measured: a 64 MB argument's
#: hop through the broker took 200 ms of CPU with a 256 KiB threshold, 154 with this one).
MMAP_THRESHOLD = 4 << 20
#: The heap's free memory goes back to the OS (``trim_heap``) once the loop has waited this long for
#: something to do (a quiet moment: a burst of large messages keeps its memory, as the next one needs
#: it again), and at most every TRIM_EVERY seconds.
TRIM_QUIET = 0.1
TRIM_EVERY = 1.0

@functools.cache
def _glibc() -> Any:
    """The C library, if it is glibc (None otherwise). The symbols this process already has: no
    ctypes.util.find_library, which runs `ldconfig -p` (a process, 10-20 ms of every daemon's start)."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc: its allocator makes its own choices
        return None
    return libc


def tune_malloc(threshold: int = MMAP_THRESHOLD) -> None:
    """Fix glibc's mmap threshold (see MMAP_THRESHOLD); a no-op with another allocator."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``, every arena): the blocks under
    MMAP_THRESHOLD that a burst of messages left free do not keep the daemon's RSS up."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def run_until_signalled(daemon: Daemon) -> int:
    """Run ``daemon`` until SIGTERM or SIGINT asks it to stop; returns the exit code."""
    tune_malloc()
    previous = {sig: signal.signal(sig, lambda *_: daemon.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    reload = getattr(daemon, "request_reload", None)
    if reload is not None:  # SIGHUP: read the allow-list of keys again
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload())
    try:
        daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        daemon.close()
    return int(getattr(daemon, "exit_code", 0))
