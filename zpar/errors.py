"""The errors a zpar user catches.

::

    ZparError
    ├── TaskError                 the task raised and its exception could not travel
    ├── WorkerLost                the worker or node running the task died
    │   └── MemoryLimitExceeded   its worker went past the agent's memory limit and was stopped
    ├── TaskTimeout               (also concurrent.futures.TimeoutError)
    ├── BrokerUnavailable         no broker answered within the deadline
    │   └── BrokenCluster         ...and work was failed for it (also concurrent.futures.BrokenExecutor)
    ├── ResultTimeout             a wait for a Pool result ran out (also multiprocessing.TimeoutError, TimeoutError)
    ├── AuthenticationError       the broker refused our credentials
    ├── QuotaExceeded             the broker refused a task that can never fit a quota (a function blob too large)
    ├── SerializationError        (also TypeError) a function, argument or result does not pickle
    │   └── PayloadTooLarge       a task is over the configured size limit
    ├── ConfigError               (also ValueError) a setting is wrong; the message says which
    └── ProtocolError             a peer sent a malformed message (daemons count and drop these)

Cancellation raises ``concurrent.futures.CancelledError`` itself, so existing
``except`` clauses keep working.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing


class ZparError(Exception):
    """Root of every error zpar raises on purpose."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a worker.

    Set as ``__cause__`` of the re-raised exception, so a printed traceback
    shows where in the remote task it started (the way concurrent.futures does).
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class TaskError(ZparError):
    """A task raised an exception whose type could not be sent back as itself.

    ``remote_type`` names the original type; ``remote_traceback`` is its text.
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[TaskError], tuple[str, str, str]]:  # keep the extra fields across pickling
        return (type(self), (self.args[0], self.remote_type, self.remote_traceback))


class WorkerLost(ZparError):
    """The process or node running the task died, and its retries (if any) ran out.

    ``exitcode`` or ``signal`` says how the worker process ended, when it is
    known (None otherwise: a node that went silent, say); ``node`` names the
    agent, ``pid`` the worker process, ``attempts`` the runs lost.
    """

    def __init__(self, message: str, *, node: str = "", pid: int = 0, exitcode: int | None = None,
                 signal: int | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.node, self.pid, self.exitcode, self.signal, self.attempts = node, pid, exitcode, signal, attempts

    def __reduce__(self) -> tuple[object, ...]:  # keep the fields across pickling
        return (_rebuild, (type(self), self.args[0], self.node, self.pid, self.exitcode, self.signal,
                           self.attempts))


def _rebuild(cls: type[WorkerLost], message: str, node: str, pid: int, exitcode: int | None, signal: int | None,
             attempts: int) -> WorkerLost:
    return cls(message, node=node, pid=pid, exitcode=exitcode, signal=signal, attempts=attempts)


class MemoryLimitExceeded(WorkerLost):
    """The task took its worker past the agent's memory limit and was stopped (not retried)."""


class TaskTimeout(ZparError, concurrent.futures.TimeoutError):
    """The task ran past its timeout and was stopped."""


class BrokerUnavailable(ZparError, ConnectionError):
    """No broker answered at the address within the deadline."""


class BrokenCluster(BrokerUnavailable, concurrent.futures.BrokenExecutor):
    """The cluster could not be reached: an Executor could not start, or pending tasks failed.

    A ``concurrent.futures.BrokenExecutor`` (what ``ProcessPoolExecutor``
    raises when its pool breaks) and a BrokerUnavailable. Unlike a broken
    process pool, a client recovers if its broker comes back: new tasks run.
    """


class ResultTimeout(ZparError, multiprocessing.TimeoutError, TimeoutError):
    """``Pool``'s ``get(timeout)`` or ``next(timeout)``: the result was not in in time (it may come later).

    Caught by ``except multiprocessing.TimeoutError`` as by ``except TimeoutError``.
    """


class AuthenticationError(ZparError, PermissionError):
    """The broker refused this peer's credentials."""


class QuotaExceeded(ZparError):
    """The broker refused this producer something no waiting can make fit.

    A task whose function blob alone is over the broker's byte quota for
    function blobs, or a client past ``--max-producers-per-key``; the message
    says which and what to raise. A producer merely at its queue's quotas is
    not refused: its tasks wait in the client and go as results come back.
    """


class SerializationError(ZparError, TypeError):
    """A function, argument or result cannot be pickled or unpickled."""


class PayloadTooLarge(SerializationError):
    """A task's arguments are larger than the configured message limit."""


class ConfigError(ZparError, ValueError):
    """A setting is missing or wrong; the message names it and the fix."""


class ProtocolError(ZparError):
    """A message does not follow the zpar wire format (protocol.py)."""
