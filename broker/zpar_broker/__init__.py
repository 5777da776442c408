"""The zpar broker daemon: routes tasks from producers to agents and results back.

Run it with ``zpar-broker`` or ``python -m zpar_broker``.

Its names load on first use: the embedded cluster's process
(``python -m zpar_broker.embedded``) imports this package first, and starts
its workers before it pays for the broker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import BrokerCore
    from .server import BrokerServer, run

__all__ = ["BrokerCore", "BrokerServer", "run"]

_WHERE = {"BrokerCore": ".core", "BrokerServer": ".server", "run": ".server"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
