"""The channels of zpar.pprocess between a creating process and each call it created, when calls are tasks.

A call runs as a zpar task (this module), in a forked child (``_fork``), or
in a persistent background process (``_persistent``). For a task:

- ``TaskChannel`` is the creating end. A call of a
  ``MakeParallel``/``MakeReusable`` wrapper is a plain task whose return value
  is its one message; any other call gets a channel of its own
  (``client.start``, zpar.streaming), and ``_CalledChannel`` is its end in
  the worker.
- ``_Runner`` is what the worker runs: the call, with random generators as a
  forked child's would be (``_state``), and the exchanges it uses itself
  placed on the same cluster (``_layer.inside``).

An Exchange watches channels: ``_has_data()``, ``_ended()``, and ``_watch``,
which task channels answer with a callback from the client's I/O thread
whenever something arrives, and fd channels with a file descriptor to poll.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from . import _layer, _state
from ._capacity import Slot, Where

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
    # the other end is gone with nothing left, whether it takes objects, and
    # how it says it changed (a callback, or a file descriptor to poll).
    def _has_data(self) -> bool:
        raise NotImplementedError

    def _ended(self) -> bool:
        raise NotImplementedError

    def _takes_input(self) -> bool:
        return True

    def _poll_fd(self) -> int | None:
        return None

    def _watch(self, watcher: Callable[[Channel], None]) -> None:
        watcher(self)  # whatever it holds already

    def _unwatch(self, watcher: Callable[[Channel], None]) -> None:
        pass

    def _exit(self) -> NoReturn:
        """``exit(channel)``: end the created side."""
        raise RuntimeError(f"exit({self!r}) is for the created side of a channel; this is the creating side")


class TaskChannel(Channel):
    """The creating end of a call running as a zpar task.

    A call of a ``MakeParallel``/``MakeReusable`` wrapper is a plain task: its
    return value is its one message. Any other call runs with a channel of
    its own (zpar.streaming), and its messages are what it sends.
    """

    def __init__(self, future: Future, callable: Callable[..., Any], *, streamed: bool,
                 slot: Slot | None = None) -> None:
        self.future = future
        self.callable = callable
        self.streamed = streamed
        self._slot = slot  # the worker reserved for it, handed to the next call when it delivers (Exchange)
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

    def _takes_input(self) -> bool:
        return self.streamed and not self._closed and not self.future.done()

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


class Unstarted(Channel):
    """A call that could not start (arguments that do not pickle, no cluster): its one message is that error."""

    def __init__(self, callable: Callable[..., Any], exc: BaseException) -> None:
        self.callable = callable
        self._exc: BaseException | None = exc

    def __repr__(self) -> str:
        return f"<zpar.pprocess channel to a call of {_name(self.callable)} that could not start>"

    def receive(self) -> Any:
        exc, self._exc = self._exc, None
        if exc is None:
            raise EOFError(f"{self!r} has nothing more to receive")
        raise exc

    def send(self, obj: Any) -> None:
        raise BrokenPipeError(f"{self!r} never ran; nothing can be sent to it")

    def _has_data(self) -> bool:
        return self._exc is not None

    def _ended(self) -> bool:
        return self._exc is None

    def _takes_input(self) -> bool:
        return False


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

    def _exit(self) -> NoReturn:
        raise _TaskExit()


class _Runner:
    """What a worker runs for one call: the callable, as a forked child of its parent would run it.

    ``random`` is freshly seeded and numpy's global generator is the parent's
    as it was when it started the call; the exchanges the call uses run on
    the cluster the call runs on. It travels as the task's function
    (cloudpickle, cached by digest on the workers), so the callable inside
    goes by value where it must, as any function does; calls started while
    nothing changed share one runner, pickled once.
    """

    def __init__(self, callable: Callable[..., Any], streamed: bool, where: Where | None,
                 state: _state.Inherited | None) -> None:
        self.callable = callable
        self.streamed = streamed
        self.where = where
        self.state = state

    def __call__(self, *args: Any, **kw: Any) -> Any:
        with _layer.inside(self.where), _state.as_forked(self.state):
            if not self.streamed:
                return self.callable(*args, **kw)
            stream, *rest = args
            try:
                self.callable(_CalledChannel(stream), *rest, **kw)
            except _TaskExit:
                pass
            return None


class _Runners:
    """The runners made lately, by callable: reused while nothing they carry has changed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: collections.OrderedDict[int, tuple[Any, tuple[Any, ...], _Runner]] = collections.OrderedDict()

    def get(self, callable: Callable[..., Any], streamed: bool, where: Where | None) -> _Runner:
        key = (streamed, where, _state.snapshot())
        with self.lock:
            hit = self.made.get(id(callable))
            if hit is not None and hit[0] is callable and hit[1] == key:
                self.made.move_to_end(id(callable))
                return hit[2]
            runner = _Runner(callable, streamed, where, key[2])
            self.made[id(callable)] = (callable, key, runner)  # holds callable, so its id stays its own
            if len(self.made) > 256:
                self.made.popitem(last=False)
            return runner


_runners = _Runners()


def _runner(callable: Callable[..., Any], streamed: bool, where: Where | None) -> _Runner:
    """The runner for a call starting now: the last one made for ``callable`` while nothing changed."""
    return _runners.get(callable, streamed, where)


def forget() -> None:
    """In a forked child: a fresh cache (another thread may have held its lock at the fork)."""
    _runners.__init__()  # type: ignore[misc]


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


def _plain(callable: Callable[..., Any], reuse: bool) -> Callable[..., Any] | None:
    """The function inside a MakeParallel (or, without reuse, a MakeReusable) of ours, else None."""
    kind = type(callable).__call__ if isinstance(callable, MakeParallel) else None
    if kind is MakeParallel.__call__ or (kind is MakeReusable.__call__ and not reuse):
        return callable.callable  # type: ignore[attr-defined, no-any-return]
    return None


def streams(callable: Callable[..., Any], reuse: bool) -> bool:
    """Whether a call of ``callable`` gets a channel (it may send, receive, wait, or never end)."""
    return _plain(callable, reuse) is None


def launch(client: Client, callable: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any], *,
           where: Where | None, slot: Slot | None = None, reuse: bool = False) -> TaskChannel:
    """Start ``callable(channel, *args, **kw)`` on ``client``'s cluster; the creating end of its channel.

    A MakeParallel's function runs as a plain task; so does a MakeReusable's
    unless ``reuse`` (then it runs with a channel, to be sent more arguments).
    """
    fn = _plain(callable, reuse)
    if fn is not None:
        future = client.submit(_runner(fn, False, where), *args, **kw)
    else:
        future = client.start(_runner(callable, True, where), *args, **kw)
    if slot is not None:
        slot.future = future
    return TaskChannel(future, callable, streamed=fn is None, slot=slot)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
