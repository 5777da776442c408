"""Forked children, as pprocess makes them: ``create()`` over a socket pair or two pipes, and ``exit()``.

``FdChannel`` is either end: messages are length-prefixed pickles over a
file descriptor to read and one to write (the same socket for a socket pair).
The parent's end is watched by an Exchange through its read descriptor.

Before forking, this process's standard streams are flushed, so that output
it buffered is written once, not once more by every child at its exit; the
child forgets the parent's zpar clients (their I/O threads did not survive
the fork), and stops the clusters it started itself when it exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import struct
import sys
from typing import Any, NoReturn

from .. import client as _client_module
from . import _channels, _layer
from ._channels import Channel, _deliver

log = logging.getLogger(__name__)

#: The children this process forked and nobody reaped yet (waitall() reaps only these).
_forked: set[int] = set()


class FdChannel(Channel):
    """Either end of a socket pair or two pipes between a forked child and its parent."""

    _HEADER = struct.Struct("!Q")

    def __init__(self, pid: int, read_fd: int, write_fd: int) -> None:
        self.pid = pid
        self.created_end = pid == 0  # the child's end: an exchange watches the parent's
        self._r = read_fd
        self._w = write_fd
        self._buf = bytearray()
        self._eof = False

    def __repr__(self) -> str:
        side = "to the parent" if self.pid == 0 else f"to child {self.pid}"
        return f"<zpar.pprocess channel {side}>"

    def fileno(self) -> int:
        return self._r

    def _poll_fd(self) -> int | None:
        return self._r

    # -- reading: whole frames out of a buffer filled from the read descriptor

    def _frame_end(self) -> int:
        """Where the first whole message in the buffer ends; 0 while there is none."""
        size = self._HEADER.size
        if len(self._buf) < size:
            return 0
        end = size + self._HEADER.unpack_from(self._buf)[0]
        return end if len(self._buf) >= end else 0

    def _frame(self) -> bytes | None:
        end = self._frame_end()
        if not end:
            return None
        frame = bytes(self._buf[self._HEADER.size:end])
        del self._buf[:end]
        return frame

    def _fill(self, block: bool) -> None:
        """Read what the descriptor holds (waiting for something first, if ``block``)."""
        poller = select.poll()
        poller.register(self._r, select.POLLIN)
        timeout: int | None = None if block else 0
        while not self._eof and poller.poll(timeout):
            try:
                data = os.read(self._r, 1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self._eof = True
                return
            self._buf += data
            timeout = 0  # then only what is there already

    def _next_frame(self) -> bytes:
        """The next whole frame, waiting for it; EOFError once the other end has gone."""
        while (frame := self._frame()) is None:
            if self._eof:
                raise EOFError(f"{self!r}: the other end has closed and everything it sent was received")
            self._fill(block=True)
        return frame

    def _write(self, frame: bytes) -> None:
        view = memoryview(self._HEADER.pack(len(frame)) + frame)
        while view:
            view = view[os.write(self._w, view):]

    def _has_data(self) -> bool:
        self._fill(block=False)
        return bool(self._frame_end())

    def _ended(self) -> bool:
        return self._eof and not self._frame_end()

    # -- the pprocess API

    def send(self, obj: Any) -> None:
        """Send ``obj`` to the other end (pickled); OSError (BrokenPipeError) once it has gone."""
        self._write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self) -> Any:
        """The next object from the other end; EOFError once it closed and all was taken."""
        return _deliver(pickle.loads(self._next_frame()))

    def close(self) -> None:
        fds = {self._r, self._w} - {-1}
        self._r = self._w = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:  # a channel dropped unclosed (an exchange left unfinished) frees its descriptors
        if getattr(self, "_r", -1) != -1:
            self.close()

    def wait(self, options: int = 0) -> None:
        """At the parent's end, reap the child (``os.waitpid`` with ``options``)."""
        if self.pid:
            try:
                if os.waitpid(self.pid, options)[0]:
                    _forked.discard(self.pid)
            except ChildProcessError:
                _forked.discard(self.pid)

    def _exit(self) -> NoReturn:
        if self.pid != 0:
            super()._exit()
        self.close()
        leave()


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing to save
            continue


def fork() -> int:
    """``os.fork()``, after flushing this process's output; the child forgets the parent's clients."""
    flush_std_streams()
    pid = os.fork()
    if pid == 0:
        # This copy must never close the parent's clients at exit: that would stop the parent's clusters.
        _client_module._live_clients.clear()
        _forked.clear()
        _layer.forget_after_fork()
        _channels.forget()
    else:
        _forked.add(pid)
    return pid


def create_socketpair() -> FdChannel:
    """Fork; a channel over a socket pair: ``pid`` 0 in the child, the child's pid in the parent."""
    parent, child = socket.socketpair()
    pid = fork()
    if pid == 0:
        parent.close()
        fd = child.detach()
        return FdChannel(0, fd, fd)
    child.close()
    fd = parent.detach()
    return FdChannel(pid, fd, fd)


def create_pipes() -> FdChannel:
    """Fork; a channel over two pipes (pprocess's way on systems whose socket pairs poll badly)."""
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = fork()
    if pid == 0:
        os.close(to_parent_r)
        os.close(to_child_w)
        return FdChannel(0, to_child_r, to_parent_w)
    os.close(to_child_r)
    os.close(to_parent_w)
    return FdChannel(pid, to_parent_r, to_child_w)


def leave() -> NoReturn:
    """End a forked child now: stop the clusters it started, flush its output, ``os._exit(0)``."""
    _layer.shutdown_after_fork()
    flush_std_streams()
    os._exit(0)


def wait_all() -> None:
    """Wait for every child this process forked to exit, and reap it."""
    while _forked:
        pid = _forked.pop()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
