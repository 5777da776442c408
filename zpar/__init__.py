"""zpar: run Python functions on every core of a machine, or of a cluster.

>>> import zpar
>>> with zpar.Client() as client:          # a private cluster, one worker per core
...     squares = list(client.map(pow, range(10), [2] * 10))
"""

from .client import Client
from .errors import (
    AuthenticationError,
    BrokerUnavailable,
    ConfigError,
    MemoryLimitExceeded,
    PayloadTooLarge,
    ProtocolError,
    RemoteTraceback,
    SerializationError,
    TaskError,
    TaskTimeout,
    WorkerLost,
    ZparError,
)
from .futures import Future
from .options import TaskOptions

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BrokerUnavailable",
    "Client",
    "ConfigError",
    "Future",
    "MemoryLimitExceeded",
    "PayloadTooLarge",
    "ProtocolError",
    "RemoteTraceback",
    "SerializationError",
    "TaskError",
    "TaskOptions",
    "TaskTimeout",
    "WorkerLost",
    "ZparError",
    "__version__",
]
