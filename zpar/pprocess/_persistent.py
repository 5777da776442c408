"""Persistent and background calls: a call that outlives its creator, collected later by whoever connects.

pprocess runs such a call in a forked process that listens on a Unix socket
file (its *address*) and closes its standard streams; the creator may go
away, and any process can later connect to the address and receive what the
call sends. zpar does the same, on this machine: a zpar task cannot outlive
the program that submitted it (the embedded cluster stops with its program,
and a broker ends a departed producer's tasks), so the call itself runs in
the forked background process, and the exchanges it uses run their calls on
zpar (a pool of its own, or the cluster ``use()`` names).

Every message on a persistent connection is acknowledged, as in pprocess, so
a sender knows it was taken: the background side sends again to the next
process that connects if the reader went away first.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import socket
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import ZparError
from . import _fork
from ._channels import Channel, _deliver
from ._exchange import Exchange
from ._fork import FdChannel
from ._results import Queue

log = logging.getLogger(__name__)


class AcknowledgementError(ZparError):
    """The other end of a persistent channel answered a message with something other than its receipt."""


class _AckChannel(FdChannel):
    """A connection of a persistent call: each message is answered by a receipt (an empty frame)."""

    def __init__(self, pid: int, read_fd: int, write_fd: int, address: str) -> None:
        super().__init__(pid, read_fd, write_fd)
        self.created_end = False  # pid 0 is also the end connect_persistent() gives: it is watched
        self.address = address
        self._early: collections.deque[bytes] = collections.deque()  # messages that came instead of a receipt

    def __repr__(self) -> str:
        return f"<zpar.pprocess persistent channel at {self.address!r}>"

    def _await_receipt(self, obj: Any) -> None:
        frame = self._next_frame()
        if frame:
            self._early.append(frame)
            raise AcknowledgementError(f"sent {obj!r} and got a message back instead of its receipt")

    def _take(self) -> bytes:
        while True:
            frame = self._early.popleft() if self._early else self._next_frame()
            if frame:
                return frame

    def _receipt(self) -> None:
        try:
            self._write(b"")
        except OSError:  # the sender went away after sending: what it sent is ours all the same
            pass

    def send(self, obj: Any) -> None:
        """Send ``obj`` and wait until the other end has received it."""
        self._write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        self._await_receipt(obj)

    def receive(self) -> Any:
        """The next object from the other end (then its receipt); EOFError once it has gone."""
        frame = self._take()
        self._receipt()
        return _deliver(pickle.loads(frame))

    def _has_data(self) -> bool:
        return bool(self._early) or super()._has_data()


class _CreatorChannel(_AckChannel):
    """The creator's end of ``create_persistent``: connects to the call's address when first used."""

    def __init__(self, pid: int, address: str) -> None:
        super().__init__(pid, -1, -1, address)

    def _connect(self) -> None:
        if self._r == -1 and not self._eof:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.address)
            self._r = self._w = sock.detach()

    def fileno(self) -> int:
        self._connect()
        return self._r

    def _poll_fd(self) -> int | None:
        return self.fileno()

    def _fill(self, block: bool) -> None:
        self._connect()
        super()._fill(block)

    def _write(self, frame: bytes) -> None:
        self._connect()
        super()._write(frame)


class PersistentChannel(_AckChannel):
    """The persistent call's own end: it listens at ``address``; whoever connects is the other end.

    One connection at a time: when the reader goes away, the next process to
    connect takes its place (a message not yet received goes to it).
    """

    def __init__(self, pid: int, endpoint: socket.socket, address: str) -> None:
        super().__init__(pid, -1, -1, address)
        self.created_end = True
        self.endpoint = endpoint

    def _accept(self) -> None:
        if self._r == -1:
            conn, _ = self.endpoint.accept()
            self._r = self._w = conn.detach()
            self._buf.clear()
            self._eof = False

    def _drop(self) -> None:
        FdChannel.close(self)
        self._early.clear()

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        while True:
            self._accept()
            try:
                self._write(data)
                self._await_receipt(obj)
                return
            except (OSError, EOFError):  # that reader left before taking it: the next one gets it
                self._drop()

    def receive(self) -> Any:
        while True:
            self._accept()
            try:
                frame = self._take()
            except (OSError, EOFError):
                self._drop()
                continue
            self._receipt()
            return _deliver(pickle.loads(frame))

    def close(self) -> None:
        """Close the channel and remove its socket file."""
        self._drop()
        self.endpoint.close()
        try:
            os.unlink(self.address)
        except OSError:
            pass

    def _exit(self) -> NoReturn:
        self.close()
        _fork.leave()


def create_persistent(address: str) -> Channel:
    """Fork a process reachable at ``address`` (a socket file to make); a channel to the other side.

    In the child (``pid`` 0): its PersistentChannel, listening there. In the
    creator: a channel to it (connected when first used), with the child's pid.
    """
    endpoint = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    endpoint.bind(address)
    try:
        os.chmod(address, 0o600)  # before listen(): nobody could connect yet
        endpoint.listen(8)  # before the fork: a process that connects as soon as this returns waits, not refused
        pid = _fork.fork()
    except BaseException:
        endpoint.close()
        os.unlink(address)
        raise
    if pid == 0:
        return PersistentChannel(0, endpoint, address)
    endpoint.close()
    return _CreatorChannel(pid, address)


def connect_persistent(address: str) -> Channel:
    """A channel to the persistent call at ``address`` (``pid`` 0: not this process's child)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()
    return _AckChannel(0, fd, fd, address)


def close_streams() -> None:
    """Detach this process from its creator's output: standard input, output and error go to /dev/null.

    pprocess closes the three descriptors; pointing them at /dev/null hides
    output the same way, and no socket opened later can take their numbers.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def start_persistent(address: str, callable: Callable[..., Any], *args: Any, **kw: Any) -> Channel:
    """Run ``callable(channel, *args, **kw)`` in a background process reachable at ``address``.

    The creator gets a channel to it; the call may outlive the creator, and
    any process can collect what it sends with ``connect_persistent(address)``.
    An exception it raises is sent as its last message.
    """
    channel = create_persistent(address)
    if channel.pid != 0:
        return channel
    close_streams()
    try:
        callable(channel, *args, **kw)
    except Exception as exc:  # noqa: BLE001 - sent to whoever collects the call, as pprocess does
        try:
            channel.send(exc)
        except Exception:  # noqa: BLE001 - it does not pickle: its text goes instead
            channel.send(ZparError(f"{type(exc).__name__}: {exc}"))
    finally:
        channel._exit()


class BackgroundCallable:
    """Calling it runs ``callable(channel, ...)`` in a background process at ``address`` (no exchange)."""

    def __init__(self, address: str, callable: Callable[..., Any]) -> None:
        self.address = address
        self.callable = callable

    def __call__(self, *args: Any, **kw: Any) -> None:
        start_persistent(self.address, self.callable, *args, **kw)


class PersistentCallable:
    """Calling it starts ``callable`` at ``address`` through a persistent exchange (``exchange.manage``)."""

    def __init__(self, address: str, callable: Callable[..., Any], exchange: Persistent) -> None:
        self.address = address
        self.callable = callable
        self.exchange = exchange

    def __call__(self, *args: Any, **kw: Any) -> None:
        self.exchange.start(self.address, self.callable, *args, **kw)


class Persistent(Exchange):
    """Makes an exchange manage persistent calls: each started at an address, collected with ``connect``."""

    def start_waiting(self, channel: Channel) -> None:
        details = self._get_waiting(channel)
        if details is not None:
            address = getattr(channel, "address", None)
            if address is None:
                raise ValueError(f"{channel!r} has no address to start a waiting persistent call at")
            fn, args, kw = details
            self.add(start_persistent(address, fn, *args, **kw))

    def start(self, address: str, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:  # type: ignore[override]
        """Start ``callable(channel, *args, **kw)`` in a background process at ``address`` (unless busy)."""
        if self._set_waiting(callable, args, kw):
            return
        start_persistent(address, callable, *args, **kw)

    def create(self, address: str) -> Channel | None:  # type: ignore[override]
        """Fork a background process at ``address``: it gets its channel, the creator None (watched here)."""
        return self._get_channel_for_process(create_persistent(address))

    def manage(self, address: str, callable: Callable[..., Any]) -> PersistentCallable:  # type: ignore[override]
        """A callable that starts ``callable`` at ``address`` through this exchange each time it is called."""
        return PersistentCallable(address, callable, self)

    def connect(self, address: str) -> None:
        """Watch the persistent call at ``address`` (once the exchange is not busy)."""
        self.add_wait(connect_persistent(address))


class PersistentExchange(Persistent, Exchange):
    """An Exchange of persistent calls."""


class PersistentQueue(Persistent, Queue):
    """A Queue of persistent calls: what they send, in arrival order."""


def BackgroundQueue(address: str) -> PersistentQueue:
    """A queue of what the persistent call at ``address`` sends."""
    queue = PersistentQueue(limit=1)
    queue.connect(address)
    return queue
