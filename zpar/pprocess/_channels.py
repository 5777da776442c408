"""The channels of zpar.pprocess: between a creating process and each call it created.

A call runs either as a zpar task or in a forked child:

- ``TaskChannel`` is the creating end of a task. A call of a
  ``MakeParallel``/``MakeReusable`` wrapper is a plain task whose return value
  is its one message; any other call gets a channel of its own
  (``client.start``, zpar.streaming), and ``_CalledChannel`` is its end in
  the worker.
- ``ForkChannel`` is either end of a socket pair to a child that ``fork()``
  made, as pprocess's ``create()`` does; messages are length-prefixed pickles.

An Exchange watches channels: ``_has_data()``, ``_ended()``, and, for task
channels, a callback (``_watch``) from the client's I/O thread whenever
something arrives; fork channels it watches by file descriptor.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import pickle
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from .. import client as _client_module

if TYPE_CHECKING:
    from ..client import Client
    from ..futures import Future

log = logging.getLogger(__name__)


class Failure:
    """A call's exception, queued where its message would have been."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _deliver(item: Any) -> Any:
    """A received item as pprocess hands it over: an exception object is raised, not returned."""
    if isinstance(item, Failure):
        raise item.exc
    if isinstance(item, Exception):
        raise item
    return item


class Channel:
    """One end of the link between a creating process and a call it created.

    ``send(obj)`` and ``receive()`` carry picklable objects each way;
    ``receive()`` raises an exception object instead of returning it, and
    EOFError once the other end is gone and everything it sent was taken.
    ``pid`` is 0 at the created end (inside the call), and at the creating
    end the forked child's pid, or None for a call running as a zpar task.
    """

    pid: int | None = None

    def send(self, obj: Any) -> None:
        raise NotImplementedError

    def receive(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Stop using the channel (a call still running at the other end is stopped)."""

    def wait(self, options: int = 0) -> None:
        """Wait for the call at the other end to end (nothing to wait for at the created end)."""

    # How an Exchange watches a channel: whether it holds a message, whether
    # the other end is gone with nothing left, and how it says it changed.
    def _has_data(self) -> bool:
        raise NotImplementedError

    def _ended(self) -> bool:
        raise NotImplementedError


class TaskChannel(Channel):
    """The creating end of a call running as a zpar task.

    A call of a ``MakeParallel``/``MakeReusable`` wrapper is a plain task: its
    return value is its one message. Any other call runs with a channel of
    its own (zpar.streaming), and its messages are what it sends.
    """

    def __init__(self, future: Future, callable: Callable[..., Any], *, streamed: bool) -> None:
        self.future = future
        self.callable = callable
        self.streamed = streamed
        self.reusable = False  # set by an Exchange with reuse=1 for a channel-aware call
        self._cv = threading.Condition()
        self._inbox: collections.deque[Any] = collections.deque()
        self._done = False  # the task ended and whatever it sent is in _inbox
        self._closed = False
        self._watchers: list[Callable[[Channel], None]] = []
        if streamed:
            future.add_ready_callback(self._notify)
        else:
            future.add_done_callback(self._task_done)

    def __repr__(self) -> str:
        return f"<zpar.pprocess channel to task {self.future.task_id} ({_name(self.callable)})>"

    # -- events, from the client's I/O thread (or at once if already so)

    def _task_done(self, fut: concurrent.futures.Future[Any]) -> None:
        if fut.cancelled():
            item: Any = Failure(concurrent.futures.CancelledError(f"{self!r} was cancelled"))
        else:
            exc = fut.exception()
            item = fut.result() if exc is None else Failure(exc)
        with self._cv:
            self._inbox.append(item)
            self._done = True
            self._cv.notify_all()
        self._notify()

    def _notify(self) -> None:
        for watcher in list(self._watchers):
            watcher(self)

    def _watch(self, watcher: Callable[[Channel], None]) -> None:
        self._watchers.append(watcher)
        watcher(self)  # whatever arrived before it was watched

    def _unwatch(self, watcher: Callable[[Channel], None]) -> None:
        try:
            self._watchers.remove(watcher)
        except ValueError:
            pass

    # -- state

    def _pull(self, timeout: float | None) -> None:
        """Move the call's next message (or its end) into the inbox, waiting up to ``timeout`` seconds."""
        if not self.streamed:
            with self._cv:
                self._cv.wait_for(lambda: self._done, timeout)
            return
        if self._done:
            return
        try:
            item: Any = self.future.receive(timeout=timeout)
        except TimeoutError:
            return
        except EOFError:
            self._done = True
            return
        except Exception as exc:  # noqa: BLE001 - the task's own exception, cancellation, a lost worker
            item, self._done = Failure(exc), True
        self._inbox.append(item)

    def _has_data(self) -> bool:
        if not self._inbox:
            self._pull(0)
        return bool(self._inbox)

    def _ended(self) -> bool:
        if self.streamed and not self._done and not self._inbox:
            self._pull(0)
        return self._done and not self._inbox

    # -- the pprocess API

    def receive(self) -> Any:
        """The call's next message; its exception if it failed; EOFError once it ended and all was taken."""
        while not self._inbox:
            if self._done:
                raise EOFError(f"{self!r} has ended and everything it sent was received")
            self._pull(None)
        return _deliver(self._inbox.popleft())

    def send(self, obj: Any) -> None:
        """Send ``obj`` to the running call's ``channel.receive()``."""
        if not self.streamed:
            raise BrokenPipeError(f"{_name(self.callable)} returns its result and reads nothing from its "
                                  "channel; start a function that takes a channel to send it objects")
        if self._closed or self.future.done():
            raise BrokenPipeError(f"{self!r} has ended; nothing can be sent to it")
        self.future.send(obj)

    def close(self) -> None:
        """Stop watching the call; one still running is stopped (its worker is replaced)."""
        if self._closed:
            return
        self._closed = True
        if not self.future.done():
            self.future.cancel(force=True)

    def wait(self, options: int = 0) -> None:
        """Wait until the call has ended (``options`` is accepted for pprocess's signature)."""
        concurrent.futures.wait([self.future])


class ForkChannel(Channel):
    """Either end of a socket pair between a forked child and its parent.

    Each message is a length-prefixed pickle. The parent's end is watched by
    an Exchange through its file descriptor.
    """

    _HEADER = struct.Struct("!Q")

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._buf = bytearray()
        self._eof = False

    def __repr__(self) -> str:
        side = "to the parent" if self.pid == 0 else f"to child {self.pid}"
        return f"<zpar.pprocess channel {side}>"

    def fileno(self) -> int:
        return self._sock.fileno()

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
        """Read what the socket holds (at least something, if ``block``)."""
        flags = 0 if block else socket.MSG_DONTWAIT
        while not self._eof:
            try:
                data = self._sock.recv(1 << 16, flags)
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self._eof = True
                return
            self._buf += data
            if block:
                return

    def _has_data(self) -> bool:
        self._fill(block=False)
        return bool(self._frame_end())

    def _ended(self) -> bool:
        return self._eof and not self._frame_end()

    def send(self, obj: Any) -> None:
        """Send ``obj`` to the other end (pickled)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._sock.sendall(self._HEADER.pack(len(data)) + data)

    def receive(self) -> Any:
        """The next object from the other end; EOFError once it closed and all was taken."""
        while (frame := self._frame()) is None:
            if self._eof:
                raise EOFError(f"{self!r}: the other end has closed and everything it sent was received")
            self._fill(block=True)
        return _deliver(pickle.loads(frame))

    def close(self) -> None:
        self._sock.close()

    def __del__(self) -> None:  # a channel dropped unclosed (an exchange left unfinished) frees its socket
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def wait(self, options: int = 0) -> None:
        """At the parent's end, reap the child (``os.waitpid`` with ``options``)."""
        if self.pid:
            try:
                if os.waitpid(self.pid, options)[0]:
                    _forked.discard(self.pid)
            except ChildProcessError:
                _forked.discard(self.pid)


class _TaskExit(BaseException):
    """``exit(channel)`` inside a zpar task: ends the call, not the worker."""


class _CalledChannel(Channel):
    """The created end, inside a zpar task: a zpar.streaming channel with pprocess's manners."""

    pid = 0

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def send(self, obj: Any) -> None:
        self._stream.send(obj)

    def receive(self) -> Any:
        return _deliver(self._stream.receive())

    def close(self) -> None:
        """Nothing to close: the channel ends with the call."""


class _WithChannel:
    """What a worker runs for a channel-aware call: ``callable(channel, *args, **kw)``, its return value ignored.

    It travels as the task's function (cloudpickle, cached by digest on the
    workers), so the callable inside goes by value where it must, as any
    function does.
    """

    def __init__(self, callable: Callable[..., Any]) -> None:
        self.callable = callable

    def __call__(self, stream: Any, *args: Any, **kw: Any) -> None:
        try:
            self.callable(_CalledChannel(stream), *args, **kw)
        except _TaskExit:
            pass


@functools.lru_cache(maxsize=256)
def _with_channel(callable: Callable[..., Any]) -> _WithChannel:
    return _WithChannel(callable)  # one per callable, so the client pickles it once


# ---------------------------------------------------------------------- wrappers and launching


class MakeParallel:
    """Wraps ``callable`` so that its return value is sent through the channel it is given."""

    def __init__(self, callable: Callable[..., Any]) -> None:
        self.callable = callable

    def __call__(self, channel: Channel, *args: Any, **kw: Any) -> None:
        channel.send(self.callable(*args, **kw))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.callable!r})"


class MakeReusable(MakeParallel):
    """Like MakeParallel, then reads ``(args, kw)`` for more calls from the channel until it reads None."""

    def __call__(self, channel: Channel, *args: Any, **kw: Any) -> None:
        channel.send(self.callable(*args, **kw))
        while (more := channel.receive()) is not None:
            args, kw = more
            channel.send(self.callable(*args, **kw))


def _plain(callable: Callable[..., Any]) -> Callable[..., Any] | None:
    """The function inside a MakeParallel/MakeReusable whose ``__call__`` is ours, else None."""
    if isinstance(callable, MakeParallel) and type(callable).__call__ in (MakeParallel.__call__,
                                                                         MakeReusable.__call__):
        return callable.callable
    return None


def launch(client: Client, callable: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> TaskChannel:
    """Start ``callable(channel, *args, **kw)`` on ``client``'s cluster; the creating end of its channel."""
    fn = _plain(callable)
    if fn is not None:
        return TaskChannel(client.submit(fn, *args, **kw), callable, streamed=False)
    return TaskChannel(client.start(_with_channel(callable), *args, **kw), callable, streamed=True)


# ---------------------------------------------------------------------- forking


#: The children create() forked and nobody reaped yet (waitall() reaps only these).
_forked: set[int] = set()


def fork() -> ForkChannel:
    """Fork this process; a channel to the other side: ``pid`` 0 in the child, the child's pid in the parent."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        parent.close()
        # This copy must never close the parent's clients at exit: that would
        # stop the parent's embedded cluster. Their I/O threads did not survive the fork anyway.
        _client_module._live_clients.clear()
        _forked.clear()
        return ForkChannel(0, child)
    child.close()
    _forked.add(pid)
    return ForkChannel(pid, parent)


def exit_created(channel: Channel) -> NoReturn:
    """End the created side: the forked child exits; a call running as a task returns.

    Raises RuntimeError at the creating end (which pprocess would have ended).
    """
    if isinstance(channel, ForkChannel) and channel.pid == 0:
        channel.close()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or broken: nothing more to save
                continue
        os._exit(0)
    if isinstance(channel, _CalledChannel):
        raise _TaskExit()
    raise RuntimeError(f"exit({channel!r}) is for the created side of a channel; this is the creating side")


def wait_all() -> None:
    """Wait for every child ``create()`` forked to exit, and reap it."""
    while _forked:
        pid = _forked.pop()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
