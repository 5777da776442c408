"""How a task runs: timeout and retries, set per client or per call."""

from __future__ import annotations

from dataclasses import dataclass

from . import protocol as P
from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options for the tasks a client (or ``client.options(...)``) submits.

    - ``timeout``: seconds a task may run before it is stopped (its worker is
      killed and replaced) and its future fails with TaskTimeout; None: no limit.
    - ``retries``: how many more times a task runs after it was lost to a dead
      worker, node or broker; past them its future fails with WorkerLost.
    - ``retry_on``: exception types raised by the task itself that also earn a
      re-run (within the same ``retries``); by default a task's own exception
      is not retried.
    """

    timeout: float | None = None
    retries: int = 3
    retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds or None, not {self.timeout!r}")
        if not 0 <= self.retries <= P.MAX_RETRIES:
            raise ConfigError(f"retries must be between 0 and {P.MAX_RETRIES}, not {self.retries!r}")
        if not isinstance(self.retry_on, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise ConfigError("retry_on must be a tuple of exception types, like (ConnectionError,)")

    @property
    def timeout_ms(self) -> int:
        return 0 if self.timeout is None else max(1, round(self.timeout * 1000))
