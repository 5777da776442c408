"""pprocess's exchanges on zpar: ``Exchange``, and its ``Map`` and ``Queue``.

An exchange watches channels (zpar.pprocess._channels): task channels tell
it through a callback from the client's I/O thread, which writes a byte to
the exchange's wake-up pipe; fork channels it polls by file descriptor. So
``ready()`` blocks in one ``poll`` for both kinds, and costs nothing per
channel that did not change.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..client import Client
from ..errors import ConfigError
from . import _channels, _layer
from ._channels import Channel, Failure, ForkChannel, MakeParallel, TaskChannel

log = logging.getLogger(__name__)


class Undefined:
    """The place of a ``Map`` result not in yet (pprocess's marker)."""


class ManagedCallable:
    """A callable whose calls are started by an exchange (``exchange.manage(callable)``)."""

    def __init__(self, callable: Callable[..., Any], exchange: Exchange) -> None:
        self.callable = callable
        self.exchange = exchange

    def __call__(self, *args: Any, **kw: Any) -> None:
        self.exchange.start(self.callable, *args, **kw)


@dataclass(slots=True)
class _Call:
    callable: Callable[..., Any]
    args: tuple[Any, ...]
    kw: dict[str, Any]
    tag: int | None  # a Map's place for the result


def _close_pipe(r: int, w: int) -> None:
    os.close(r)
    os.close(w)


class Exchange:
    """Watches channels and hands those with data to ``store_data`` (define it in a subclass).

    ``limit``: at most that many channels at once; calls started past it wait
    in ``waiting``. ``reuse``: a channel-aware call that delivered data is
    sent the next waiting call's ``(args, kw)``, or None when none waits.
    ``continuous``: calls send many messages (no reuse hand-off). ``autoclose``:
    close a channel, and wait for its call, when it is removed. ``client``:
    the zpar client to run calls on (default: see ``use``).
    """

    def __init__(self, channels: Iterable[Channel] | None = None, limit: int | None = None, reuse: int = 0,
                 continuous: int = 0, autoclose: int = 1, *, client: Client | None = None) -> None:
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be at least 1 (or None: no limit), not {limit!r}")
        self.limit = limit
        self.reuse = reuse
        self.continuous = continuous
        self.autoclose = autoclose
        self.waiting: collections.deque[_Call] = collections.deque()
        self.removed: list[Channel] = []
        self._client = client
        self._channels: dict[Channel, None] = {}  # the active ones, in the order they came
        self._lock = threading.Lock()
        self._dirty: dict[Channel, None] = {}  # channels that may hold data or have ended
        self._wake_r, self._wake_w = os.pipe()  # task channels' events wake ready() in poll
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Closed when the exchange is collected, which no watched channel allows; not at exit,
        # while the client's I/O thread may still report to it (a closed fd could be reused).
        weakref.finalize(self, _close_pipe, self._wake_r, self._wake_w).atexit = False
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self._by_fd: dict[int, ForkChannel] = {}
        for channel in channels or ():
            self.add(channel)

    # -- channels

    def add(self, channel: Channel) -> None:
        """Watch ``channel`` (from ``start()`` or ``create()``)."""
        if isinstance(channel, ForkChannel):
            if channel.pid == 0:
                raise ValueError(f"{channel!r} is the created end; add the creating end")
            self._channels[channel] = None
            self._by_fd[channel.fileno()] = channel
            self._poller.register(channel.fileno(), select.POLLIN)
            self._mark(channel)  # it may hold data read already
        elif isinstance(channel, TaskChannel):
            self._channels[channel] = None
            channel._watch(self._event)
        else:
            raise TypeError(f"an Exchange watches the channels of start() and create(), not {channel!r}")

    def _event(self, channel: Channel) -> None:
        """From any thread: ``channel`` may have data, or may have ended."""
        self._mark(channel)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full, so a wake-up is pending anyway
            pass
        except OSError as exc:  # the exchange is being torn down
            log.debug("zpar.pprocess: exchange wake-up failed: %s", exc)

    def _mark(self, channel: Channel) -> None:
        with self._lock:
            self._dirty[channel] = None

    def active(self) -> list[Channel]:
        """The channels being watched."""
        return list(self._channels)

    def remove(self, channel: Channel) -> None:
        """Stop watching ``channel``; with ``autoclose``, close it and wait for its call."""
        del self._channels[channel]
        with self._lock:
            self._dirty.pop(channel, None)
        if isinstance(channel, ForkChannel):
            del self._by_fd[channel.fileno()]
            self._poller.unregister(channel.fileno())
        elif isinstance(channel, TaskChannel):
            channel._unwatch(self._event)
        if self.autoclose:
            channel.close()
            channel.wait()

    def ready(self, timeout: float | None = None) -> list[Channel]:
        """The channels holding data, waiting up to ``timeout`` milliseconds (None: until there is some).

        Channels whose call has ended with nothing left to read are removed on
        the way (listed in ``removed``); so this may return an empty list
        early. With no channel to watch it returns an empty list at once.
        """
        self.removed = []
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        polled = False
        while True:
            readable = self._sweep()
            if readable or self.removed or not self._channels:
                return readable
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if polled and left == 0:
                return []
            polled = True
            for fd, _ in self._poller.poll(None if left is None else left * 1000):
                if fd == self._wake_r:
                    _drain(fd)
                elif fd in self._by_fd:
                    self._mark(self._by_fd[fd])

    def _sweep(self) -> list[Channel]:
        with self._lock:
            candidates, self._dirty = self._dirty, {}
        readable: list[Channel] = []
        keep: dict[Channel, None] = {}
        for channel in candidates:
            if channel not in self._channels:
                continue
            if channel._has_data():
                readable.append(channel)
                keep[channel] = None  # level-triggered: still ready until it is read
            elif channel._ended():
                self.remove(channel)
                self.removed.append(channel)
        with self._lock:
            self._dirty.update(keep)
        return readable

    # -- limits and waiting calls

    def unfinished(self) -> bool:
        """Whether calls are running or waiting."""
        return bool(self._channels or self.waiting)

    def busy(self) -> bool:
        """Whether as many channels are watched as ``limit`` allows."""
        return self.limit is not None and len(self._channels) >= self.limit

    def add_wait(self, channel: Channel) -> None:
        """``add(channel)`` once the exchange is not busy."""
        self.wait()
        self.add(channel)

    def wait(self) -> None:
        """Store incoming data until the exchange is not busy."""
        while self.busy():
            self.store()

    def finish(self) -> None:
        """Store incoming data until no call runs or waits."""
        while self.unfinished():
            self.store()

    def store(self, timeout: float | None = None) -> None:
        """Hand each channel with data to ``store_data``, waiting up to ``timeout`` ms for some; start waiting calls."""
        if self._channels:
            for channel in self.ready(timeout):
                self.store_data(channel)
                self.start_waiting(channel)
                if channel in self._channels and channel._ended():  # its slot is free now, not at the next ready()
                    self.remove(channel)
                    self.removed.append(channel)
        self._start_calls()

    def store_data(self, channel: Channel) -> None:
        """Take the data ``channel`` holds (``channel.receive()``): define it in a subclass."""
        raise NotImplementedError("define store_data(self, channel) in a subclass of Exchange, "
                                  "or use a Map or a Queue")

    def start_waiting(self, channel: Channel) -> None:
        """After data from ``channel``: with ``reuse``, give its call the next waiting arguments, or None."""
        if not (self.reuse and not self.continuous and isinstance(channel, TaskChannel) and channel.reusable):
            return
        if channel.future.done():
            return
        call = self.waiting.popleft() if self.waiting and self.waiting[0].callable is channel.callable else None
        try:
            channel.send(None if call is None else (call.args, call.kw))
        except Exception:
            if not channel.future.done():
                raise
            if call is not None:  # it ended meanwhile: the call waits for a task of its own
                self.waiting.appendleft(call)
            return
        if call is not None:
            self._placed(channel, call.tag)

    # -- starting calls

    def start(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``callable(channel, *args, **kw)`` as a task, now or, past ``limit``, when a call ends."""
        self.waiting.append(_Call(callable, args, kw, self._reserve()))
        self._start_calls()

    def _start_calls(self) -> None:
        if self.waiting and not self._channels and self.busy():
            raise ConfigError(f"limit={self.limit!r} leaves no room for the {len(self.waiting)} waiting calls")
        while self.waiting and not self.busy():
            call = self.waiting.popleft()
            try:
                channel = _channels.launch(self._get_client(), call.callable, call.args, call.kw)
            except Exception as exc:  # e.g. arguments that do not pickle
                if self._not_started(call, exc):
                    continue
                raise
            channel.reusable = bool(self.reuse) and channel.streamed
            self._placed(channel, call.tag)
            self.add(channel)

    def _get_client(self) -> Client:
        if self._client is None:
            self._client = _layer.get_client()
        return self._client

    def create(self) -> Channel | None:
        """Fork this process: the child gets its channel, the parent None (the exchange watches the child).

        Waits first while the exchange is busy. Raises RemoteForkError if this
        exchange runs its calls on a cluster given by address.
        """
        _layer.check_fork(self._client)
        tag = self._reserve()
        self.wait()
        channel = _layer.fork()
        if channel.pid == 0:
            return channel
        self._placed(channel, tag)
        self.add(channel)
        return None

    def manage(self, callable: Callable[..., Any]) -> ManagedCallable:
        """A callable that starts ``callable`` through this exchange each time it is called."""
        return ManagedCallable(callable, self)

    # Where a Map puts results: a place reserved when a call is made, tied to its channel.
    def _reserve(self) -> int | None:
        return None

    def _placed(self, channel: Channel, tag: int | None) -> None:
        pass

    def _not_started(self, call: _Call, exc: Exception) -> bool:
        """A call could not start: True if it was kept as its result (a Map's way), False to raise ``exc``."""
        return False


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class Map(Exchange):
    """An exchange that keeps one result per call, in the order the calls were made.

    ``results[i]`` and ``results[i:j]`` wait for those results; iterating
    yields each in order as soon as it and those before it are in. A call's
    exception is raised where its result is read.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.init()

    def init(self) -> None:
        """Forget previous results."""
        self.results: list[Any] = []
        self.current_index = 0
        self._places: dict[Channel, int] = {}

    def _reserve(self) -> int:
        self.results.append(Undefined)
        return len(self.results) - 1

    def _placed(self, channel: Channel, tag: int | None) -> None:
        if tag is not None:
            self._places[channel] = tag

    def _not_started(self, call: _Call, exc: Exception) -> bool:
        if call.tag is None:
            return False
        self.results[call.tag] = Failure(exc)
        return True

    def add(self, channel: Channel) -> None:
        if channel not in self._places:
            self._places[channel] = self._reserve()
        super().add(channel)

    def remove(self, channel: Channel) -> None:
        place = self._places.pop(channel, None)
        super().remove(channel)
        if place is not None and self.results[place] is Undefined:
            self.results[place] = Failure(EOFError(f"call {place} ended without sending a result"))

    def __call__(self, callable: Callable[..., Any], sequence: Iterable[Any]) -> Map:
        """Start ``callable(item)`` for each item (wrapped in MakeParallel unless it is one); returns self."""
        wrapped = callable if isinstance(callable, MakeParallel) else MakeParallel(callable)
        self.init()
        for item in sequence:
            self.start(wrapped, item)
        return self

    def store_data(self, channel: Channel) -> None:
        place = self._places.pop(channel, None)
        if place is None:
            raise RuntimeError(f"{channel!r} sent a second message, but a Map keeps one result per call; "
                               "collect continuous calls with a Queue")
        try:
            self.results[place] = channel.receive()
        except Exception as exc:  # noqa: BLE001 - the call's own exception, kept for whoever reads this result
            self.results[place] = Failure(exc)

    def __iter__(self) -> Map:
        return self

    def __next__(self) -> Any:
        while True:
            if self.current_index < len(self.results) and self.results[self.current_index] is not Undefined:
                self.current_index += 1
                return _deliver_result(self.results[self.current_index - 1])
            if not self.unfinished():
                raise StopIteration
            self.store()

    next = __next__  # pprocess programs written for Python 2 call it by this name

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, int) and not -len(self.results) <= i < len(self.results):
            raise IndexError(i)
        while True:
            values = self.results[i]
            if not (values is Undefined or (isinstance(i, slice) and any(v is Undefined for v in values))):
                if isinstance(i, slice):
                    return [_deliver_result(v) for v in values]
                return _deliver_result(values)
            if not self.unfinished():
                raise IndexError(i)
            self.store()


def _deliver_result(value: Any) -> Any:
    if isinstance(value, Failure):
        raise value.exc
    return value


class Queue(Exchange):
    """An exchange whose messages are read in the order they arrive: iterate over it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.queue: collections.deque[Any] = collections.deque()

    def store_data(self, channel: Channel) -> None:
        self.queue.append(channel.receive())

    def __iter__(self) -> Queue:
        return self

    def __next__(self) -> Any:
        while not self.queue:
            if not self.unfinished():
                raise StopIteration
            self.store()
        return self.queue.popleft()

    next = __next__

    def __len__(self) -> int:
        """How many messages have arrived and are not read yet."""
        return len(self.queue)
