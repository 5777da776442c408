"""The errors a zpar user catches.

::

    ZparError
    ├── TaskError                 the task raised and its exception could not travel
    ├── WorkerLost                the worker or node running the task died (also BrokenProcessPool)
    │   └── MemoryLimitExceeded   its worker went past the agent's memory limit and was stopped
    ├── InitializerError          an Executor's initializer raised: the Executor is broken (also BrokenProcessPool)
    ├── TaskTimeout               (also concurrent.futures.TimeoutError)
    ├── BrokerUnavailable         no broker answered within the deadline
    │   └── BrokenCluster         ...and work was failed for it (also concurrent.futures.BrokenExecutor)
    ├── ResultTimeout             a wait for a Pool result ran out (also multiprocessing.TimeoutError, TimeoutError)
    ├── AuthenticationError       the broker refused our credentials
    ├── QuotaExceeded             the broker refused a task that can never fit a quota (a function blob too large)
    ├── SerializationError        (also TypeError, pickle.PicklingError) a function, argument or result does not pickle
    │   ├── PayloadTooLarge       a task is over the configured size limit
    │   └── UnpicklingError       a result or exception came back and does not unpickle (also pickle.UnpicklingError)
    ├── ConfigError               (also ValueError) a setting is wrong; the message says which
    └── ProtocolError             a peer sent a malformed message (daemons count and drop these)

The stdlib's ``except`` clauses catch them where the meaning matches:
``except BrokenProcessPool`` (and ``BrokenExecutor``) catches a lost worker
and a failed initializer, ``except pickle.PicklingError`` a value that does
not pickle. A task that raised ``SystemExit``, ``KeyboardInterrupt`` or
``GeneratorExit`` (its worker survives them) re-raises it as itself from
``result()``, as ``ProcessPoolExecutor`` does.

``WorkerLost``, ``MemoryLimitExceeded``, ``InitializerError`` and
``ResultTimeout`` load on first use (``zpar._pool_errors``): their stdlib
bases live in ``concurrent.futures.process`` and ``multiprocessing``, about
15 ms of imports that the daemons and workers, which never raise them, skip.

Cancellation raises ``concurrent.futures.CancelledError`` itself, so existing
``except`` clauses keep working.
"""

from __future__ import annotations

import concurrent.futures
import pickle
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time: __getattr__
    from ._pool_errors import InitializerError as InitializerError
    from ._pool_errors import MemoryLimitExceeded as MemoryLimitExceeded
    from ._pool_errors import ResultTimeout as ResultTimeout
    from ._pool_errors import WorkerLost as WorkerLost

_LAZY = frozenset({"InitializerError", "MemoryLimitExceeded", "ResultTimeout", "WorkerLost"})


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import _pool_errors

    value = getattr(_pool_errors, name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)


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
    ``raised``: the ``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit``
    (any BaseException that is not an Exception) a worker caught and survived,
    which the client raises as itself (``result()`` never returns this TaskError
    then); None otherwise.
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "",
                 raised: BaseException | None = None) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.raised = raised

    def __reduce__(self) -> tuple[type[TaskError], tuple[str, str, str, BaseException | None]]:
        # Keeps the fields across pickling. A worker stands in for a base exception with a TaskError
        # whose __cause__ is that exception: it travels too, since pickling drops __cause__.
        raised = self.raised
        cause = self.__cause__
        if raised is None and cause is not None and not isinstance(cause, Exception):
            raised = cause
        return (type(self), (self.args[0], self.remote_type, self.remote_traceback, raised))

    def as_raised(self) -> BaseException:
        """What ``result()`` raises for this error: ``raised``, given this error's ``__cause__`` (the
        remote traceback), ``remote_traceback``, ``host`` and ``pid``; else this error itself."""
        raised = self.raised
        if raised is None:
            return self
        raised.__cause__ = self.__cause__
        for name in ("remote_traceback", "host", "pid"):
            if name in self.__dict__:
                setattr(raised, name, self.__dict__[name])
        return raised


def _rebuild(cls: type[WorkerLost], message: str, node: str, pid: int, exitcode: int | None, signal: int | None,
             attempts: int) -> WorkerLost:
    """Unpickles a WorkerLost with its fields (here, where pickles made before it moved still find it)."""
    return cls(message, node=node, pid=pid, exitcode=exitcode, signal=signal, attempts=attempts)


class DependencyError(ZparError):
    """A task took another task's Future as an argument, and that task failed (raised, was lost, timed out
    or was cancelled): this one never ran. ``__cause__`` is that task's own error; ``task_id`` its id."""

    def __init__(self, message: str, task_id: int = 0) -> None:
        super().__init__(message)
        self.task_id = task_id


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


class AuthenticationError(ZparError, PermissionError):
    """The broker refused this peer's credentials."""


class ResourceUnavailable(ZparError):
    """The task asked for resources (``client.options(resources=...)``) that no connected node offered for
    its ``resource_timeout``; the message names what it asked and what the nodes offer. Start an agent
    with ``--resources`` offering them, or ask for less."""


class QuotaExceeded(ZparError):
    """The broker refused this producer something no waiting can make fit.

    A task whose function blob alone is over the broker's byte quota for
    function blobs, or a client past ``--max-producers-per-key``; the message
    says which and what to raise. A producer merely at its queue's quotas is
    not refused: its tasks wait in the client and go as results come back.
    """


class SerializationError(ZparError, TypeError, pickle.PicklingError):
    """A function, argument or result cannot be pickled or unpickled.

    A ``TypeError`` and a ``pickle.PicklingError``: what the stdlib raises
    for a value that does not pickle (either, depending on the value).
    """


class PayloadTooLarge(SerializationError):
    """A task's arguments are larger than the configured message limit."""


class UnpicklingError(SerializationError, pickle.UnpicklingError):
    """A result, an exception or a stream's object came back and could not be unpickled here.

    Whatever unpickling raised (even ``SystemExit``) is the ``__cause__``:
    unpickling runs code the value names, and it fails this task only.
    """

    @classmethod
    def of(cls, exc: BaseException, what: str) -> UnpicklingError:
        """The error for ``what`` (a result of task N, say) failing to unpickle with ``exc``."""
        if isinstance(exc, SerializationError):  # serialize.loads' own: its message names what it was
            err = cls(str(exc))
            err.__cause__ = exc.__cause__ or exc
        else:
            err = cls(f"cannot unpickle the {what}: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
        return err


class ConfigError(ZparError, ValueError):
    """A setting is missing or wrong; the message names it and the fix."""


class ProtocolError(ZparError):
    """A message does not follow the zpar wire format (protocol.py)."""
