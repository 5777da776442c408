"""Where ``zpar.pp`` jobs go: nodes (the local pool, remote brokers) and which one takes the next job."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from ..client import Client
from ..errors import ConfigError

#: A node is handed at most this many jobs per worker: one running, one queued behind it.
PREFETCH = 2
#: Seconds between asks for a remote broker's worker count (and reconnection attempts).
REFRESH_INTERVAL = 1.0
#: The port of a ppservers entry given as a bare host name: zpar-broker's default frontend.
DEFAULT_PORT = 5555
#: A node's address when its broker is to be found on the LAN (ppservers entry "*": zpar._discovery).
DISCOVER = "*"


class NodeState(enum.Enum):
    CONNECTING = "connecting"  # a remote broker that has not answered yet
    READY = "ready"
    RETIRING = "retiring"  # a replaced local pool, finishing the jobs it holds


class Node:
    """The embedded cluster ("local") or a remote broker ("host:port"), with its count of jobs."""

    __slots__ = ("address", "capacity", "client", "inflight", "name", "state", "warned")

    def __init__(self, name: str, address: str | None, client: Client | None = None, capacity: int = 0) -> None:
        self.name, self.address, self.client, self.capacity = name, address, client, capacity
        self.inflight = 0  # jobs handed to it and not back yet
        self.state = NodeState.READY if client is not None else NodeState.CONNECTING
        self.warned = False  # that it did not answer


def least_loaded(nodes: Sequence[Node]) -> Node | None:
    """The ready node with room and the fewest jobs per worker; the first of equals (local goes first, as in pp)."""
    best: Node | None = None
    for node in nodes:
        has_room = node.state is NodeState.READY and node.capacity > 0 and node.inflight < PREFETCH * node.capacity
        if has_room and (best is None or node.inflight * best.capacity < best.inflight * node.capacity):
            best = node
    return best


def broker_address(entry: str) -> tuple[str, str]:
    """``(node name, address)`` for a ppservers entry: "host", "host:port" or a ZeroMQ address.

    "*" is pp's autodiscovery: the broker announced on the LAN whose key matches
    the secret (address ``DISCOVER``). pp's "*:port" (its broadcast port) is a ConfigError.
    """
    if not isinstance(entry, str):
        raise TypeError(f"ppservers entries must be strings, not {entry!r}")
    if entry == "*":
        return DISCOVER, DISCOVER
    if "*" in entry:
        raise ConfigError(
            f"ppservers entry {entry!r}: zpar.pp's autodiscovery is '*' alone (the broker announced on the LAN, "
            "no port to give); or name the zpar broker, e.g. ppservers=('tcp://host:5555',)")
    if "://" in entry:
        return entry.split("://", 1)[1], entry
    host, _, port = entry.partition(":")
    if not host or (port and not port.isdigit()):
        raise ConfigError(f"ppservers entry {entry!r} is not 'host', 'host:port' or 'tcp://host:port'")
    port = port or str(DEFAULT_PORT)
    return f"{host}:{port}", f"tcp://{host}:{port}"
