"""What the broker's core asks its loop to send."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from zpar import protocol as P


class Dest(enum.Enum):
    FRONTEND = "frontend"  # producers
    BACKEND = "backend"  # agents


@dataclass(slots=True)
class Outgoing:
    """A message for the server loop to send: ``frames`` follow the header."""

    dest: Dest
    peer: bytes
    msg: P.Message
    frames: list[Any] = field(default_factory=list)
