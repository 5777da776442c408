"""The agent keeps results until the broker acknowledges them, and sends overdue ones again."""

from __future__ import annotations

from zpar import protocol as P
from zpar.agent.outbox import Unacked


def entries(*ids):
    return [P.ResultEntry(i, P.Status.OK, 1, 5) for i in ids]


def test_results_are_kept_until_acknowledged():
    box = Unacked()
    box.sent(entries(1, 2, 3), [b"r1", b"r2", b"r3"], now=0.0)
    box.acked((1, 3))
    assert len(box) == 1
    ((again, frames),) = list(box.take(now=10.0, older_than=1.0))
    assert [e.id for e in again] == [2] and frames == [b"r2"]


def test_only_overdue_results_are_sent_again_and_then_count_as_sent_anew():
    box = Unacked()
    box.sent(entries(1), [b"a"], now=0.0)
    box.sent(entries(2), [b"b"], now=5.0)
    assert [[e.id for e in es] for es, _ in box.take(now=5.5, older_than=1.0)] == [[1]]
    assert list(box.take(now=5.6, older_than=1.0)) == []


def test_the_oldest_are_dropped_past_the_limit():
    box = Unacked(limit=2)
    box.sent(entries(1, 2, 3), [b"a", b"b", b"c"], now=0.0)
    assert [e.id for es, _ in box.take(now=1.0) for e in es] == [2, 3]
