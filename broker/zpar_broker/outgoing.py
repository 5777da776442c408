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
