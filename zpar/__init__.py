"""zpar: run Python functions on every core of a machine, or of a cluster.

>>> import zpar
>>> with zpar.Client() as client:          # a private cluster, one worker per core
...     squares = list(client.map(pow, range(10), [2] * 10))
"""

from .aio import as_completed_async
from .client import Client
from .errors import (
    AuthenticationError,
    BrokenCluster,
    BrokerUnavailable,
    ConfigError,
    MemoryLimitExceeded,
    PayloadTooLarge,
    ProtocolError,
    QuotaExceeded,
    RemoteTraceback,
    ResultTimeout,
    SerializationError,
    TaskError,
    TaskTimeout,
    WorkerLost,
    ZparError,
)
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
    "Executor",
    "Future",
    "MemoryLimitExceeded",
    "PayloadTooLarge",
    "Pool",
    "Process",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteTraceback",
    "ResultTimeout",
    "SerializationError",
    "TaskError",
    "TaskOptions",
    "TaskTimeout",
    "WorkerLost",
    "ZparError",
    "__version__",
    "as_completed_async",
]
