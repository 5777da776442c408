"""How many producers each key has connected, so that one key cannot open sessions without bound.

Every producer session costs the broker a record, its queues and its quotas;
quotas are per session, so a key opening sessions without end could hold
quotas without end. A HELLO from a key with ``limit`` live producers already
is refused (``ErrorCode.TOO_MANY_PEERS``). A session ends when the core
forgets the producer (BYE, silence, revocation); the shell prunes each tick, and
before it refuses anyone.
Agents are not counted: with a shared secret every agent of a cluster holds
one key.
"""

from __future__ import annotations

import collections
from collections.abc import Callable


class KeySessions:
    """Live producer sessions per key (the ZAP User-Id), at most ``limit`` each."""

    def __init__(self, limit: int, alive: Callable[[bytes], bool]) -> None:
        self.limit, self._alive = limit, alive  # alive(peer): the core still knows that producer
        self._key_of: dict[bytes, str] = {}  # producer routing id -> its key
        self._count: collections.Counter[str] = collections.Counter()

    def admit(self, peer: bytes, key: str) -> bool:
        """Whether ``peer`` (saying HELLO with ``key``) may have a session; noted if so."""
        if peer in self._key_of:
            return True
        if self._count[key] >= self.limit:
            self.prune()  # some may have left since the last tick
            if self._count[key] >= self.limit:
                return False
        self._key_of[peer] = key
        self._count[key] += 1
        return True

    def prune(self) -> None:
        """Forget the sessions of producers the core no longer knows."""
        for peer in [p for p in self._key_of if not self._alive(p)]:
            key = self._key_of.pop(peer)
            self._count[key] -= 1
            if not self._count[key]:
                del self._count[key]

    def count(self, key: str) -> int:
        return self._count[key]
