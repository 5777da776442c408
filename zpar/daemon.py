"""What the broker's and the agent's loops share: a wake-up, draining, signals.

A daemon object has ``stop()`` (safe from a signal handler or another
thread), ``run()`` (its poll loop) and ``close()``.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any, Callable, Protocol

import zmq

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


def drain(sock: zmq.Socket, handler: Callable[[list[zmq.Frame]], Any], log: logging.Logger,
          on_error: Callable[[], None] | None = None) -> None:
    """Hand up to DRAIN waiting messages to ``handler``; one that fails is logged and dropped."""
    for _ in range(DRAIN):
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than raising zmq.Again at the end
            return
        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        try:
            handler(frames)
        except Exception:  # a bug must not take the daemon down; say so loudly
            if on_error is not None:
                on_error()
            log.exception("error handling a message; dropped it")


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
