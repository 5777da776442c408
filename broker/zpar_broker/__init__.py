"""The zpar broker daemon: routes tasks from producers to agents and results back.

Run it with ``zpar-broker`` or ``python -m zpar_broker``.
"""

from .core import BrokerCore
from .server import BrokerServer, run

__all__ = ["BrokerCore", "BrokerServer", "run"]
