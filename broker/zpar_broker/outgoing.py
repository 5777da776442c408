"""What the broker's core asks its loop to send."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from zpar import protocol as P


class Dest(enum.Enum):
    FRONTEND = "frontend"  # producers
    BACKEND = "backend"  # agents


@dataclass(slots=True)
class Outgoing:
    """A message for the server loop to send to ``peer``."""

    dest: Dest
    peer: bytes
    msg: P.Message


def forced_cancels(stop: dict[bytes, list[int]]) -> list[Outgoing]:
    """A forced CANCEL to each agent for its tasks in ``stop``, in messages of at most MAX_ENTRIES ids."""
    return [Outgoing(Dest.BACKEND, aid, P.Cancel(chunk, force=True)) for aid, gids in stop.items()
            for chunk in P.chunks(gids)]
