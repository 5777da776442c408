"""How a task runs: timeout and retries, priority and resources, set per client or per call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import protocol as P
from .config import parse_resources
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
    - ``priority``: higher runs first among this client's queued tasks
      (default 0); other clients' tasks are still served in turn.
    - ``resources``: what the task needs free on a node while it runs, as
      ``{"gpu": 1, "memory": 8 << 30}``; it runs only on agents started with
      ``--resources`` offering them, never more at once than they offer.
    - ``resource_timeout``: seconds a task with ``resources`` may wait for a
      node able to take it before it fails with ResourceUnavailable; None:
      it waits (``zpar status`` warns when no node could ever take it).
    """

    timeout: float | None = None
    retries: int = 3
    retry_on: tuple[type[BaseException], ...] = ()
    priority: int = 0
    resources: Mapping[str, float] = field(default_factory=dict)
    resource_timeout: float | None = None
    #: What the wire carries of the three above (None: nothing to carry), made once.
    sched: P.Sched | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds or None, not {self.timeout!r}")
        if not 0 <= self.retries <= P.MAX_RETRIES:
            raise ConfigError(f"retries must be between 0 and {P.MAX_RETRIES}, not {self.retries!r}")
        if not isinstance(self.retry_on, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise ConfigError("retry_on must be a tuple of exception types, like (ConnectionError,)")
        if type(self.priority) is not int or not P.MIN_PRIORITY <= self.priority <= P.MAX_PRIORITY:
            raise ConfigError(f"priority must be an integer from {P.MIN_PRIORITY} to {P.MAX_PRIORITY}, "
                              f"not {self.priority!r}")
        resources = _resources(self.resources)
        if self.resource_timeout is not None and not self.resource_timeout > 0:
            raise ConfigError("resource_timeout must be a positive number of seconds or None, "
                              f"not {self.resource_timeout!r}")
        object.__setattr__(self, "resources", dict(resources))
        if self.priority or resources:
            timeout_ms = 0 if self.resource_timeout is None else max(1, round(self.resource_timeout * 1000))
            object.__setattr__(self, "sched", P.Sched(self.priority, resources, timeout_ms))

    @property
    def timeout_ms(self) -> int:
        return 0 if self.timeout is None else max(1, round(self.timeout * 1000))


def _resources(value: Any) -> tuple[tuple[str, float], ...]:
    """``resources`` checked, as the wire's sorted pairs (amounts of 0 dropped: they ask for nothing)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"resources must be a mapping of names to amounts, like {{'gpu': 1}}, not {value!r}")
    return tuple(pair for pair in parse_resources(value, "a task") if pair[1])
