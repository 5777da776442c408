"""``zpar.process.Process``: ``multiprocessing.Process``, run as a task on a zpar cluster.

::

    from zpar.process import Process

    def work(n):
        ...

    p = Process(target=work, args=(10,))
    p.start()                 # runs work(10) on a worker of the cluster
    p.join(timeout=30)
    p.exitcode                # 0; 1 if it raised; sys.exit(n) gives n

Subclasses overriding ``run()`` work as with multiprocessing: the Process
object is pickled (cloudpickle: a class in ``__main__`` travels by value) and
``run()`` is called on the worker. Changes ``run()`` makes to ``self`` stay
there, as they stay in a multiprocessing child.

Where it runs: ``Process(..., client=c)`` runs on client ``c``. Without one,
every Process shares a default client, made on the first ``start()``:
``zpar.Client()``, a private cluster on this machine (one worker per core),
stopped at exit; :func:`set_default_client` points them at another cluster.
At exit, as multiprocessing does, non-daemon processes are joined and daemon
ones terminated, before the default client stops.

Differences from multiprocessing:

- The target runs in a worker that already exists and goes on running other
  tasks afterwards; it is not a fresh child of this process. ``pid`` is that
  worker's pid, known once the task has started there (None before, and
  while it waits in the queue).
- ``exitcode``: 0 on return; the code of ``sys.exit(code)`` (None gives 0, a
  non-integer 1, its text printed to the worker's stderr); 1 if ``run()``
  raised (the traceback is printed to the worker's stderr, as multiprocessing
  prints it in the child; ``exception`` holds it here); ``-SIGTERM`` after
  ``terminate()`` or a task timeout, ``-SIGKILL`` after ``kill()``; if its
  worker died, ``-N`` for signal N or the worker's exit code (``os._exit(3)``
  gives 3), 1 when the cause is unknown (its node was lost).
- A Process is never run again when its worker dies (``retries=0``).
- No ``sentinel``, ``authkey`` or ``parent_process``; ``daemon`` only decides
  what happens at exit (above).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import _default, serialize
from .client import Client
from .errors import SerializationError, TaskTimeout, WorkerLost, ZparError
from .futures import Future
from .streaming import Channel

__all__ = ["Process", "active_children", "set_default_client"]

_counter = itertools.count(1)
_children: set[Process] = set()  # started and not known to be finished (joined at exit)


def set_default_client(client: Client | None) -> None:
    """Run Processes started without ``client=`` on ``client`` (None: an embedded cluster, made when needed).

    This is the drop-in layers' one default (zpar.pprocess uses it too).
    """
    _default.shared.use(client)


def active_children() -> list[Process]:
    """Processes started here and not finished yet (``multiprocessing.active_children``)."""
    return [p for p in list(_children) if p.is_alive()]


def _bootstrap(channel: Channel, blob: bytes) -> int:
    """On the worker: say which pid runs us, run the process, return its exit code."""
    channel.send(os.getpid())
    run = pickle.loads(blob)  # the process's bound run(): the process came with it
    process = run.__self__
    try:
        run()
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        sys.stderr.write(f"{exc.code}\n")
        return 1
    except BaseException:
        sys.stderr.write(f"Process {process.name}:\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise
    return 0


class Process:
    """A ``multiprocessing.Process`` that runs on a zpar cluster (see the module docstring).

    ``group`` must be None (as in multiprocessing); ``client`` is the cluster
    to run on (default: the shared default client).
    """

    def __init__(self, group: None = None, target: Callable[..., Any] | None = None, name: str | None = None,
                 args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None, *, daemon: bool | None = None,
                 client: Client | None = None) -> None:
        if group is not None:
            raise ValueError("group argument must be None for now")
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self._name = name or f"Process-{next(_counter)}"
        self.daemon = bool(daemon)
        self._client = client
        self._future: Future | None = None
        self._pid: int | None = None
        self._signal = 0  # the signal terminate() or kill() stands for
        self._exitcode: int | None = None
        self.exception: BaseException | None = None  # what run() raised, once known

    # ------------------------------------------------------------------ multiprocessing's API

    def run(self) -> None:
        """What the process does (on the worker); by default ``target(*args, **kwargs)``."""
        if self._target is not None:
            self._target(*self._args, **self._kwargs)

    def start(self) -> None:
        """Start running ``run()`` on a worker of the cluster; at most once."""
        if self._future is not None:
            raise AssertionError("cannot start a process twice")
        try:
            # As a function is (cloudpickle), not as arguments are (plain pickle first): then its target
            # and a subclass defined in __main__ or in a module registered by value travel by value.
            _, blob = serialize.dump_function(self.run)
        except SerializationError as exc:
            raise SerializationError(
                f"cannot pickle the process {self._name!r} (its target, arguments or attributes): "
                f"{exc.__cause__ or exc}. It runs on a worker of the cluster, not in a child of this "
                "process, so multiprocessing queues, pipes, locks and shared values cannot reach it: return "
                "a value (zpar futures) or talk to it over a channel (client.start)") from exc
        client = self._client or _default.shared.get()
        self._future = client.options(retries=0).start(_bootstrap, blob)
        _children.add(self)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the process ends, or ``timeout`` seconds; never raises for how it ended."""
        fut = self._started("join")
        concurrent.futures.wait([fut], timeout)
        if fut.done():
            self._finish()

    def is_alive(self) -> bool:
        """Started and not ended (a process waiting in the cluster's queue is alive)."""
        return self._future is not None and not self._future.done()

    def terminate(self) -> None:
        """Stop the process (its worker is stopped and replaced); ``exitcode`` becomes ``-SIGTERM``."""
        self._stop(signal.SIGTERM)

    def kill(self) -> None:
        """As ``terminate()``; ``exitcode`` becomes ``-SIGKILL``."""
        self._stop(signal.SIGKILL)

    def close(self) -> None:
        """Let go of what the process holds; ValueError while it runs."""
        if self.is_alive():
            raise ValueError(f"cannot close process {self._name}: it is still running")
        if self._future is not None:
            self._finish()
        _children.discard(self)

    @property
    def exitcode(self) -> int | None:
        """None while it runs (or before ``start()``); then how it ended (see the module docstring)."""
        if self._future is None or not self._future.done():
            return None
        return self._finish()

    @property
    def pid(self) -> int | None:
        """The pid of the worker running it, once it started there."""
        if self._pid is None and self._future is not None:
            self._read_pid()
        return self._pid

    ident = pid

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    # ------------------------------------------------------------------ inside

    def _started(self, what: str) -> Future:
        if self._future is None:
            raise AssertionError(f"can only {what} a started process")
        return self._future

    def _stop(self, sig: int) -> None:
        fut = self._started("terminate")
        if not fut.done() and fut.cancel(force=True):
            self._signal = sig

    def _read_pid(self) -> None:
        fut = self._future
        if fut is None:
            raise RuntimeError(f"process {self._name}: its pid was read before it started")
        try:
            self._pid = fut.receive(timeout=0)
        except (TimeoutError, EOFError, concurrent.futures.CancelledError, ZparError):
            # Not started yet, or ended before it said (the pid goes first, before any of run()'s errors).
            self._pid = None

    def _finish(self) -> int:
        """The exit code of an ended process (worked out once)."""
        if self._exitcode is not None:
            return self._exitcode
        fut = self._future
        if fut is None:
            raise RuntimeError(f"process {self._name}: its exit code was worked out before it started")
        if self._pid is None:
            self._read_pid()
        if fut.cancelled():
            code = -(self._signal or signal.SIGTERM)
        else:
            exc = fut.exception()
            if exc is None:
                code = fut.result()
            elif isinstance(exc, TaskTimeout):
                code = -signal.SIGTERM
            elif isinstance(exc, WorkerLost):
                code = _lost_code(exc)
            else:
                self.exception = exc
                code = 1
        self._exitcode = code
        _children.discard(self)
        return code

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_client", "_future"):
            state[key] = None
        return state

    def __repr__(self) -> str:
        if self._future is None:
            status = "initial"
        elif self._future.done():
            status = f"stopped exitcode={self._finish()}"
        else:
            status = "started"
        daemon = " daemon" if self.daemon else ""
        return f"<{type(self).__name__} name={self._name!r} pid={self._pid} {status}{daemon}>"


def _lost_code(exc: WorkerLost) -> int:
    """``-N`` for a worker killed by signal N, its exit code, or 1 (a node lost, say)."""
    if exc.signal is not None:
        return -exc.signal
    if exc.exitcode is not None:
        return exc.exitcode
    return 1


@atexit.register
def _at_exit() -> None:
    # Registered after zpar.client's own handler, so it runs first: the default client is still up.
    for process in list(_children):
        if process.daemon and process.is_alive():
            process.terminate()
    for process in list(_children):
        if not process.daemon and process._future is not None:
            process.join()
