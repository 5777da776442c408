"""The node agent: keeps one worker process per core busy with the broker's tasks.

Run it with ``zpar-agent --broker tcp://HOST:5556`` or ``python -m zpar.agent``.
"""

from .core import AgentCore
from .server import AgentServer, run

__all__ = ["AgentCore", "AgentServer", "run"]
