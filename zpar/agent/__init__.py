"""The node agent: keeps one worker process per core busy with the broker's tasks.

Run it with ``zpar-agent --broker tcp://HOST:5556`` or ``python -m zpar.agent``.

Its names load on first use: a worker (``python -m zpar.agent.worker``)
imports this package too, and should not pay for the agent's server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import AgentCore
    from .server import AgentServer, run

__all__ = ["AgentCore", "AgentServer", "run"]

_WHERE = {"AgentCore": ".core", "AgentServer": ".server", "run": ".server"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
