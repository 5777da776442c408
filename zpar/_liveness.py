"""The one liveness rule: a peer is alive while it was heard from within ``beats`` heartbeats.

The broker judges agents and producers with it, an agent judges its broker,
and a producer judges its broker. Any message counts as a sign of life; each
loop also sends a heartbeat every interval, so a silent peer is one whose
loop is stuck or gone (ZMTP keep-alives would still be answered by a process
whose main thread is stuck, so they do not count).
"""

from __future__ import annotations

from dataclasses import dataclass

#: A producer's I/O thread shares the GIL with the user's code, which may hold it for a long
#: while: a producer and the broker judge each other at this multiple of the window.
PRODUCER_SLACK = 2.0


@dataclass(frozen=True, slots=True)
class Liveness:
    """``heartbeat`` seconds between beats; ``beats`` missed in a row means gone."""

    heartbeat: float = 1.0
    beats: int = 3

    @property
    def window(self) -> float:
        """Seconds of silence after which a peer is judged gone."""
        return self.heartbeat * self.beats

    def silent(self, now: float, last_heard: float, slack: float = 1.0) -> bool:
        """True when a peer last heard at ``last_heard`` has been silent too long at ``now``."""
        return now - last_heard > self.window * slack

    def cutoff(self, now: float, slack: float = 1.0) -> float:
        """Peers last heard before this time are silent (``silent`` for many peers at once)."""
        return now - self.window * slack
