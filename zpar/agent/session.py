"""The agent's session with its broker, with no sockets: registration, pace, liveness, unacknowledged results.

::

    agent                                   broker
      | HELLO ------------------------------> |   at start; again when it is silent for
      | <------------------ WELCOME(epoch, pace) |   a liveness window, or says UNKNOWN_PEER
      | HEARTBEAT (every beat) -------------> |
      | RESULT (collector) -----------------> |   kept in ``unacked`` until ...
      | <----------------------------- ACK(ids) |   ... acknowledged; sent again when overdue,
                                                  and all again after a WELCOME of the same epoch

A WELCOME of another epoch means the broker restarted: the tasks we hold and
the results it has not acknowledged belong to a broker that is gone
(``restarted``). The broker's pace (heartbeat and liveness) wins over ours.
"""

from __future__ import annotations

import dataclasses
import logging

from zpar import protocol as P
from zpar._liveness import Liveness

from .outbox import Unacked

log = logging.getLogger(__name__)


class BrokerSession:
    """What the agent knows of its broker; each method is fed ``now`` and returns the messages to send."""

    def __init__(self, identity: bytes, hello: P.Hello, now: float, *, heartbeat: float, liveness: int) -> None:
        self.identity = identity  # ours: names our results on the collector hop, where PULL hides the sender
        self._hello = hello  # workers filled in at each HELLO
        self.rule = Liveness(heartbeat, liveness)
        self.epoch = ""  # of the broker that welcomed us
        self.welcomed = False
        self.last_heard = now
        self.next_beat = now  # the first beat goes at once
        self.unacked = Unacked()

    def heard(self, now: float) -> None:
        """Any message from the broker is a sign of life."""
        self.last_heard = now

    def hello(self, workers: int) -> P.Hello:
        """Introduce ourselves (again): until the WELCOME we ask for no credits and re-send nothing."""
        self.welcomed = False
        return dataclasses.replace(self._hello, workers=workers)

    def left(self) -> None:
        """The broker said BYE (stopping): wait for it to come back."""
        self.welcomed = False

    def restarted(self, msg: P.Welcome) -> bool:
        """True when this WELCOME is from a broker other than the one that gave us our tasks."""
        return bool(self.epoch) and msg.epoch != self.epoch

    def welcome(self, now: float, msg: P.Welcome) -> list[P.Result]:
        """Registered: adopt the broker's epoch and pace; returns what to send it again.

        The same broker after we registered anew may have lost what we sent
        (all of it goes again); a restarted one has no use for it (dropped).
        """
        again: list[P.Result] = []
        if self.restarted(msg):
            self.unacked.clear()
        elif self.epoch:
            again = [P.Result(tuple(run), self.identity, msg.epoch) for run in self.unacked.take(now)]
        self.epoch = msg.epoch
        self.rule = Liveness(msg.heartbeat, msg.liveness)
        self.next_beat = min(self.next_beat, now + msg.heartbeat)
        self.welcomed = True
        return again

    def beat_due(self, now: float) -> bool:
        """True once a heartbeat interval, the next beat then scheduled."""
        if now < self.next_beat:
            return False
        self.next_beat = now + self.rule.heartbeat
        return True

    def silent(self, now: float) -> bool:
        """The broker went quiet for a liveness window (restarting?): time to say HELLO again."""
        if not self.rule.silent(now, self.last_heard):
            return False
        log.warning("no word from the broker for %.1f s; saying HELLO again", now - self.last_heard)
        self.last_heard = now  # one HELLO per window while it stays silent
        return True

    def overdue(self, now: float) -> list[P.Result]:
        """Results unacknowledged for a liveness window (lost on the way?), to send again."""
        if not self.welcomed:
            return []
        return [P.Result(tuple(run), self.identity, self.epoch)
                for run in self.unacked.take(now, older_than=self.rule.window)]

    def results(self, now: float, entries: list[P.ResultEntry]) -> P.Result:
        """A run of results to send, kept until the broker acknowledges it."""
        self.unacked.sent(entries, now)
        return P.Result(tuple(entries), self.identity, self.epoch)

    def items(self, entries: list[P.ItemEntry], credits: list[P.Credit]) -> P.Items:
        return P.Items(tuple(entries), tuple(credits), self.identity, self.epoch)

    def acked(self, ids: tuple[int, ...]) -> None:
        """The broker has these results, or (a send that could not go) they wait to be sent again."""
        self.unacked.acked(ids)
