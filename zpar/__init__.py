"""zpar: run Python functions on every core of a machine, or of a cluster.

>>> import zpar
>>> with zpar.Client() as client:          # a private cluster, one worker per core
...     squares = list(client.map(pow, range(10), [2] * 10))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    BrokenCluster,
    BrokerUnavailable,
    ConfigError,
    DependencyError,
    PayloadTooLarge,
    ProtocolError,
    QuotaExceeded,
    RemoteTraceback,
    ResourceUnavailable,
    SerializationError,
    TaskError,
    TaskTimeout,
    ZparError,
)

if TYPE_CHECKING:
    from ._progress import progress
    from ._refs import Ref
    from .aio import as_completed_async
    from .client import Client
    from .errors import MemoryLimitExceeded, ResultTimeout, WorkerLost
    from .executor import Executor
    from .futures import Future
    from .options import TaskOptions
    from .pool import Pool
    from .process import Process
    from .streaming import Channel

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BrokenCluster",
    "BrokerUnavailable",
    "Channel",
    "Client",
    "ConfigError",
    "DependencyError",
    "Executor",
    "Future",
    "MemoryLimitExceeded",
    "PayloadTooLarge",
    "Pool",
    "Process",
    "ProtocolError",
    "QuotaExceeded",
    "Ref",
    "RemoteTraceback",
    "ResourceUnavailable",
    "ResultTimeout",
    "SerializationError",
    "TaskError",
    "TaskOptions",
    "TaskTimeout",
    "WorkerLost",
    "ZparError",
    "__version__",
    "as_completed_async",
    "progress",
]

# The producer's API loads on first use: a worker process imports this package too (its modules
# live in it) and needs none of it, and every worker's start-up is on the path to a first result.
# So do the errors whose stdlib bases are heavy to import (zpar.errors says why).
_LAZY = {"as_completed_async": ".aio", "Client": ".client", "Executor": ".executor", "Future": ".futures",
         "TaskOptions": ".options", "Pool": ".pool", "Process": ".process", "Channel": ".streaming", "Ref": "._refs",
         "MemoryLimitExceeded": ".errors", "ResultTimeout": ".errors", "WorkerLost": ".errors",
         "progress": "._progress"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
