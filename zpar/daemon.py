"""What the broker's and the agent's loops share: a wake-up, draining, signals.

A daemon object has ``stop()`` (safe from a signal handler or another
thread), ``run()`` (its poll loop) and ``close()``.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from typing import Any, Callable, Protocol

import zmq

from . import protocol as P

#: Messages taken from one socket before looking at the others (fairness).
DRAIN = 256


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

    def close(self) -> None:
        self._r.close()
        self._w.close()


def recv_bounded(sock: zmq.Socket, max_frames: int) -> list[zmq.Frame] | None:
    """The next message, or None (read and dropped) if it has more than ``max_frames`` parts.

    Parts past the limit are read as bytes, not Frame objects: a message of
    200,000 empty parts then costs about 0.25 s instead of 0.75 s.
    """
    frames = [sock.recv(zmq.NOBLOCK, copy=False)]
    while frames[-1].more:
        if len(frames) > max_frames:
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv(copy=True)
            return None
        frames.append(sock.recv(copy=False))
    return frames


def drain(sock: zmq.Socket, handler: Callable[[list[zmq.Frame]], Any], log: logging.Logger,
          on_error: Callable[[], None] | None = None,
          on_oversized: Callable[[], None] | None = None) -> None:
    """Hand up to DRAIN waiting messages to ``handler``; one that fails is logged and dropped.

    A message of more than protocol.MAX_FRAMES parts is dropped unread (``on_oversized``).
    """
    for _ in range(DRAIN):
        events: int = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        if not events & zmq.POLLIN:  # cheaper than raising zmq.Again at the end
            return
        frames = recv_bounded(sock, P.MAX_FRAMES + 2)  # + a routing id and the header
        if frames is None:
            if on_oversized is not None:
                on_oversized()
            continue
        try:
            handler(frames)
        except Exception:  # a bug must not take the daemon down; say so loudly
            if on_error is not None:
                on_error()
            log.exception("error handling a message; dropped it")


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
    try:
        while True:
            timeout = max(0.0, min(p.next_deadline() for p in parts) - time.monotonic())
            events = dict(poller.poll(int(timeout * 1000) + 1))
            if waker.fileno() in events:
                return
            for part in parts:
                part.handle(events)
            now = time.monotonic()
            if any([part.on_timers(now) for part in parts]):  # a list: every part's timers fire
                return
    finally:
        for part in parts:
            part.shutdown()


class Daemon(Protocol):
    def stop(self) -> None: ...
    def run(self) -> None: ...
    def close(self) -> None: ...


def run_until_signalled(daemon: Daemon) -> int:
    """Run ``daemon`` until SIGTERM or SIGINT asks it to stop; returns the exit code."""
    previous = {sig: signal.signal(sig, lambda *_: daemon.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        daemon.close()
    return 0
