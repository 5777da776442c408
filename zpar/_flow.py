"""The stream flow-control window: one rule, used by both ends of every stream.

Each direction of each task's stream (zpar.streaming) has one sender and one
receiver: the task's yields and ``Channel.send`` go to the producer's
``stream()``/``receive()``; the producer's ``Future.send`` goes to the task's
``Channel.receive()``. The producer (zpar.streaming, under its lock) and the
worker (zpar.agent.worker, in its one thread) hold the same two classes::

    sender: SendWindow                       receiver: ReceiveWindow
    may_send()? then seq = sent(nbytes) --ITEM seq--> arrived(seq): NEW, REPEAT or GAP
                                                      (the user takes it) taken(nbytes) -> upto | None
    granted(upto)                     <--CREDIT upto--

The rule:

- The sender may send item ``seq`` while ``seq < upto``, the last credit it
  got (``window`` before any), and while fewer than ``budget`` bytes it sent
  are unread; when nothing is unread any object goes, so one larger than the
  budget goes alone. Unread bytes stay under ``budget`` plus one object.
- The receiver counts the items taken (read, or discarded unread) and grants
  ``upto = taken + window`` once that is half a window past its last credit,
  or once a quarter of the budget was taken since it.
- So a credit ``upto`` also tells the sender that its items below
  ``upto - window`` were taken: their bytes are no longer unread. Both ends
  must use the same ``window``.
- The receiver drops a repeated item by its seq; an item beyond the one
  expected means one was lost on the way, and the stream is broken.

Sans-I/O: no locks, no sockets, no clocks. The caller moves the items and
credits and serialises the calls (its lock, or its only thread).
"""

from __future__ import annotations

import collections
import enum

from . import protocol as P

#: Objects a sender may be ahead of what its receiver has taken.
WINDOW = P.STREAM_WINDOW
#: Bytes a sender may have unread before it waits (one larger object still goes, alone).
WINDOW_BYTES = P.STREAM_BYTES

__all__ = ["WINDOW", "WINDOW_BYTES", "Arrival", "ReceiveWindow", "SendWindow"]


class SendWindow:
    """The sending end of one direction of one stream."""

    __slots__ = ("_budget", "_sizes", "_window", "next_seq", "unread", "upto")

    def __init__(self, window: int = WINDOW, budget: int = WINDOW_BYTES) -> None:
        self._window = window
        self._budget = budget
        self.next_seq = 0  # items sent: the next one's seq
        self.upto = window  # items with seq below this may be sent (the receiver's last credit)
        self.unread = 0  # bytes of the items sent and not known taken
        self._sizes: collections.deque[int] = collections.deque()  # each of those items' bytes, oldest first

    def may_send(self) -> bool:
        """True when the next item may go now; else wait for ``granted``.

        It does not depend on the next item's size, on purpose: the receiver
        credits only after a quarter budget or half a window was taken, so
        waiting for room for a big object behind a few small unread ones
        could wait for a credit that never comes.
        """
        return self.next_seq < self.upto and (self.unread < self._budget or not self._sizes)

    def sent(self, nbytes: int) -> int:
        """Count an item of ``nbytes`` as sent; returns its seq. RuntimeError unless ``may_send()``."""
        if not self.may_send():
            raise RuntimeError(f"item {self.next_seq} sent beyond the stream's window (upto {self.upto}, "
                               f"{self.unread} bytes unread): wait until may_send()")
        seq = self.next_seq
        self.next_seq = seq + 1
        self._sizes.append(nbytes)
        self.unread += nbytes
        return seq

    def granted(self, upto: int) -> bool:
        """A credit from the receiver: items below ``upto`` may be sent.

        Returns True when it moved the window on (wake a waiting sender); a
        stale or repeated credit (they can cross on the way) changes nothing.
        """
        if upto <= self.upto:
            return False
        self.upto = upto
        # The receiver took every item below upto - window: what it took is no longer unread.
        taken = min(upto - self._window, self.next_seq)
        for _ in range(taken - (self.next_seq - len(self._sizes))):
            self.unread -= self._sizes.popleft()
        return True


class Arrival(enum.Enum):
    """What an item that arrived is to its receiver."""

    NEW = "new"  # the one expected next: keep it
    REPEAT = "repeat"  # one already here (sent again after a reconnection): drop it
    GAP = "gap"  # an item before it was lost on the way: the stream is broken


class ReceiveWindow:
    """The receiving end of one direction of one stream."""

    __slots__ = ("_budget", "_bytes", "_window", "broken", "credited", "next_seq", "taken_items")

    def __init__(self, window: int = WINDOW, budget: int = WINDOW_BYTES) -> None:
        self._window = window
        self._budget = budget
        self.next_seq = 0  # items that arrived in order: the next one's seq
        self.taken_items = 0  # of those, items the user took (or that were discarded)
        self.credited = window  # the last credit granted (the sender starts with one window)
        self._bytes = 0  # bytes taken since then
        self.broken = False  # an item was lost on the way

    def arrived(self, seq: int) -> Arrival:
        """Classify an item by its ``seq``; only a NEW one counts as arrived.

        After a GAP every later item is a GAP too: the stream stays broken, so
        nothing after a lost item is ever delivered.
        """
        if seq < self.next_seq:
            return Arrival.REPEAT
        if seq > self.next_seq or self.broken:
            self.broken = True
            return Arrival.GAP
        self.next_seq = seq + 1
        return Arrival.NEW

    def taken(self, nbytes: int, count: int = 1) -> int | None:
        """The user took (or discarded) ``count`` items of ``nbytes`` in all.

        Returns the credit ``upto`` to grant the sender now, or None.
        RuntimeError if more items were taken than arrived.
        """
        if self.taken_items + count > self.next_seq:
            raise RuntimeError(f"{self.taken_items + count} items taken but {self.next_seq} arrived")
        self.taken_items += count
        self._bytes += nbytes
        upto = self.taken_items + self._window
        if upto - self.credited >= self._window // 2 or self._bytes >= self._budget // 4:
            self.credited, self._bytes = upto, 0
            return upto
        return None
