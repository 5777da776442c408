"""pprocess's ``Exchange`` on zpar (its ``Map`` and ``Queue`` are in ``_results``).

An exchange watches channels (zpar.pprocess._channels): task channels tell
it through a callback from the client's I/O thread, which writes a byte to
the exchange's wake-up pipe; fd channels (forked children, persistent
calls) it polls by file descriptor. So ``ready()`` blocks in one ``poll``
for both kinds, and costs nothing per channel that did not change.

Scheduling follows pprocess's hooks, called where pprocess calls them, so a
subclass that overrides them steers the same way: ``start`` asks
``_set_waiting`` whether the call must wait; after each message ``store``
calls ``start_waiting(channel)``, which asks ``_get_waiting(channel)`` for
the next waiting call (handed to that channel's call with ``reuse``; none
for ``continuous`` exchanges); ``store`` starts waiting calls itself only
when no channel is left; ``create`` hands the forked channel to
``_get_channel_for_process``.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..client import Client
from ..errors import ConfigError
from . import _channels, _fork, _layer
from ._capacity import Slot, Where
from ._channels import Channel, TaskChannel, Unstarted

log = logging.getLogger(__name__)

Waiting = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ManagedCallable:
    """A callable whose calls are started by an exchange (``exchange.manage(callable)``)."""

    def __init__(self, callable: Callable[..., Any], exchange: Exchange) -> None:
        self.callable = callable
        self.exchange = exchange

    def __call__(self, *args: Any, **kw: Any) -> None:
        self.exchange.start(self.callable, *args, **kw)


def _close_pipe(r: int, w: int) -> None:
    os.close(r)
    os.close(w)


class Exchange:
    """Watches channels and hands those with data to ``store_data`` (define it in a subclass).

    ``limit``: at most that many channels at once; calls started past it wait
    in ``waiting``, as ``(callable, args, kw)``. ``reuse``: a channel-aware
    call that delivered data is sent the next waiting call's ``(args, kw)``,
    or None when none waits. ``continuous``: calls send many messages (and
    waiting calls start once no channel is left). ``autoclose``: close a
    channel, and wait for its call, when it is removed. ``client``: the zpar
    client to run calls on (default: see ``use``).
    """

    def __init__(self, channels: Iterable[Channel] | None = None, limit: int | None = None, reuse: int = 0,
                 continuous: int = 0, autoclose: int = 1, *, client: Client | None = None) -> None:
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be at least 1 (or None: no limit), not {limit!r}")
        self.limit = limit
        self.reuse = reuse
        self.continuous = continuous
        self.autoclose = autoclose
        self.waiting: list[Waiting] = []  # the next to start is the last (pprocess inserts at 0, pops the end)
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
        self._by_fd: dict[int, Channel] = {}
        for channel in channels or ():
            self.add(channel)

    # -- channels

    def add(self, channel: Channel) -> None:
        """Watch ``channel`` (from ``start()``, ``create()`` or ``connect_persistent()``)."""
        if not isinstance(channel, Channel):
            raise TypeError(f"an Exchange watches the channels of start() and create(), not {channel!r}")
        if getattr(channel, "created_end", False):
            raise ValueError(f"{channel!r} is the created end; add the creating end")
        if channel in self._channels:  # added again (reuse): nothing more to watch
            return
        fd = channel._poll_fd()
        self._channels[channel] = None
        if fd is not None:
            self._by_fd[fd] = channel
            self._poller.register(fd, select.POLLIN)
        channel._watch(self._event)

    def _event(self, channel: Channel) -> None:
        """From any thread: ``channel`` may have data, or may have ended."""
        with self._lock:
            self._dirty[channel] = None
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full, so a wake-up is pending anyway
            pass
        except OSError as exc:  # the exchange is being torn down
            log.debug("zpar.pprocess: exchange wake-up failed: %s", exc)

    def active(self) -> list[Channel]:
        """The channels being watched."""
        return list(self._channels)

    def remove(self, channel: Channel) -> None:
        """Stop watching ``channel``; with ``autoclose``, close it and wait for its call."""
        del self._channels[channel]
        with self._lock:
            self._dirty.pop(channel, None)
        for fd, watched in list(self._by_fd.items()):
            if watched is channel:
                del self._by_fd[fd]
                self._poller.unregister(fd)
        channel._unwatch(self._event)
        if self.autoclose:
            channel.close()
            channel.wait()
        if not self._channels and not self.waiting:
            _layer.settle()

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
                    self._event(self._by_fd[fd])

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

    # -- limits

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
        """Hand each channel with data to ``store_data``, waiting up to ``timeout`` ms for some.

        After each, ``start_waiting(channel)``. A channel whose ``store_data``
        raises OSError (pprocess's IOError: the other end went away) is
        removed with a warning. With no channel left, waiting calls start.
        """
        if not self._channels:
            while self.waiting and not self.busy():
                fn, args, kw = self.waiting.pop()
                self.add(self._launch(fn, args, kw))
            return
        for channel in self.ready(timeout):
            try:
                self.store_data(channel)
                self.start_waiting(channel)
            except OSError as exc:
                if channel in self._channels:
                    self.remove(channel)
                warnings.warn(f"zpar.pprocess: removed {channel!r} after an OSError: {exc}",
                              RuntimeWarning, stacklevel=2)
                continue
            if channel in self._channels and channel._ended():  # its place is free now, not at the next ready()
                self.remove(channel)
                self.removed.append(channel)

    def store_data(self, channel: Channel) -> None:
        """Take the data ``channel`` holds (``channel.receive()``): define it in a subclass."""
        raise NotImplementedError("define store_data(self, channel) in a subclass of Exchange, "
                                  "or use a Map or a Queue")

    # -- pprocess's scheduling hooks (override them to steer which calls start when)

    def _get_waiting(self, channel: Channel) -> Waiting | None:
        """After data from ``channel``: the waiting call to start now, if any.

        With ``reuse`` the next waiting call's ``(args, kw)`` goes to
        ``channel``'s running call instead (None when nothing waits, which
        ends a MakeReusable call). Continuous exchanges start none here.
        """
        if self.waiting and not self.continuous:
            details = self.waiting.pop()
            if not (self.reuse and channel._takes_input()):
                return details
            try:
                channel.send((details[1], details[2]))
            except BrokenPipeError:
                if channel._takes_input():
                    raise
                self.waiting.append(details)  # it ended meanwhile: the call waits for a start of its own
                return None
            self.add(channel)  # again: a Map places the next result
        elif self.reuse and channel._takes_input():
            channel.send(None)
        return None

    def _set_waiting(self, callable: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> int:
        """Whether the call must wait (then it is queued in ``waiting``): 1 while the exchange is busy."""
        if self.busy():
            self.waiting.insert(0, (callable, args, kw))
            return 1
        return 0

    def _get_channel_for_process(self, channel: Channel) -> Channel | None:
        """After a fork: the child gets its channel; the parent watches it (once not busy) and gets None."""
        if channel.pid == 0:
            return channel
        self.add_wait(channel)
        return None

    def start_waiting(self, channel: Channel) -> None:
        """After data from ``channel``: start the waiting call ``_get_waiting`` names, if any."""
        details = self._get_waiting(channel)
        if details is not None:
            fn, args, kw = details
            self.add(self._launch(fn, args, kw, after=channel))

    # -- starting calls

    def start(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``callable(channel, *args, **kw)`` as a task, now or, past ``limit``, when a call makes room."""
        if self._set_waiting(callable, args, kw):
            return
        self.add_wait(self._launch(callable, args, kw))

    def _launch(self, callable: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any],
                after: Channel | None = None) -> Channel:
        """Start one call; its channel (an Unstarted one holding the error if it could not start).

        A channel-aware call, or any call of an exchange with a limit, holds a
        worker for as long as it lives; on the embedded default it gets one of
        its own (the pool starts more as needed). A call started because
        ``after`` delivered takes over the worker reserved for ``after``.
        """
        reuse = bool(self.reuse)
        slot: Slot | None = None
        try:
            if self._client is not None:
                client, where = self._client, Where.of(self._client)
            else:
                slot = self._take_over(after)
                if slot is not None:
                    client, where = slot.client, slot.where
                else:
                    held = _channels.streams(callable, reuse) or self.limit is not None
                    hint = max(1, self.limit - len(self._channels)) if self.limit else 1
                    client, slot, where = _layer.place(held, hint)
            return _channels.launch(client, callable, args, kw, where=where, slot=slot, reuse=reuse)
        except Exception as exc:  # noqa: BLE001 - e.g. arguments that do not pickle: the call's error, where it is read
            if slot is not None:
                slot.release()
            return Unstarted(callable, exc)

    def _take_over(self, after: Channel | None) -> Slot | None:
        if self.continuous or not isinstance(after, TaskChannel):
            return None
        slot, after._slot = after._slot, None
        return slot if slot is not None and slot.live() else None

    def create(self) -> Channel | None:
        """Fork this process: the child gets its channel, the parent None (the exchange watches the child).

        Raises RemoteForkError if this exchange runs its calls on a cluster
        given by address.
        """
        _layer.check_fork(self._client)
        return self._get_channel_for_process(_fork.create_socketpair())

    def manage(self, callable: Callable[..., Any]) -> ManagedCallable:
        """A callable that starts ``callable`` through this exchange each time it is called."""
        return ManagedCallable(callable, self)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
