"""The zpar errors whose stdlib bases are heavy to import, loaded on first use (see ``zpar.errors``).

``concurrent.futures.process`` (for ``BrokenProcessPool``) and
``multiprocessing`` (for its ``TimeoutError``) cost about 15 ms of imports
with no use in a daemon or a worker. ``zpar.errors`` hands these classes out
by name, and they call themselves ``zpar.errors.X``, so they pickle and print
as if defined there.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures.process import BrokenProcessPool

from .errors import ZparError, _rebuild


class WorkerLost(ZparError, BrokenProcessPool):
    """The process or node running the task died, and its retries (if any) ran out.

    A ``BrokenProcessPool``, what ``ProcessPoolExecutor`` raises when a worker
    dies, so the stdlib's ``except`` clauses catch it; unlike a process pool,
    the Executor or Client goes on: its other tasks and new ones run.

    ``exitcode`` or ``signal`` says how the worker process ended, when it is
    known (None otherwise: a node that went silent, say); ``node`` names the
    agent, ``pid`` the worker process, ``attempts`` the runs lost.
    """

    __module__ = "zpar.errors"

    def __init__(self, message: str, *, node: str = "", pid: int = 0, exitcode: int | None = None,
                 signal: int | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.node, self.pid, self.exitcode, self.signal, self.attempts = node, pid, exitcode, signal, attempts

    def __reduce__(self) -> tuple[object, ...]:  # keep the fields across pickling
        return (_rebuild, (type(self), self.args[0], self.node, self.pid, self.exitcode, self.signal,
                           self.attempts))


class MemoryLimitExceeded(WorkerLost):
    """The task took its worker past the agent's memory limit and was stopped (not retried)."""

    __module__ = "zpar.errors"


class InitializerError(ZparError, BrokenProcessPool):
    """An Executor's ``initializer`` raised in a worker (its exception is the ``__cause__``).

    As with ``ProcessPoolExecutor``, the Executor is broken from then on: its
    pending futures fail with this error, and ``submit`` raises it.
    """

    __module__ = "zpar.errors"


class ResultTimeout(ZparError, multiprocessing.TimeoutError, TimeoutError):
    """``Pool``'s ``get(timeout)`` or ``next(timeout)``: the result was not in in time (it may come later).

    Caught by ``except multiprocessing.TimeoutError`` as by ``except TimeoutError``.
    """

    __module__ = "zpar.errors"
