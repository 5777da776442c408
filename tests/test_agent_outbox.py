"""The agent keeps results until the broker acknowledges them, and sends overdue ones again."""

from __future__ import annotations

from zpar import protocol as P
from zpar.agent.outbox import Unacked


def entries(*ids):
    return [P.ResultEntry(i, P.Status.OK, (b"r%d" % i, b"buffer"), 5) for i in ids]


def test_results_are_kept_until_acknowledged():
    box = Unacked()
    box.sent(entries(1, 2, 3), now=0.0)
    box.acked((1, 3))
    assert len(box) == 1
    (again,) = list(box.take(now=10.0, older_than=1.0))
    assert list(again) == entries(2)  # with its payload


def test_only_overdue_results_are_sent_again_and_then_count_as_sent_anew():
    box = Unacked()
    box.sent(entries(1), now=0.0)
    box.sent(entries(2), now=5.0)
    assert [[e.id for e in es] for es in box.take(now=5.5, older_than=1.0)] == [[1]]
    assert list(box.take(now=5.6, older_than=1.0)) == []


def test_the_oldest_are_dropped_past_the_limit():
    box = Unacked(limit=2)
    box.sent(entries(1, 2, 3), now=0.0)
    assert [e.id for es in box.take(now=1.0) for e in es] == [2, 3]


def test_results_sent_again_go_in_runs_that_fit_a_message():
    box = Unacked()
    box.sent(entries(*range(P.BATCH_MAX_TASKS + 1)), now=0.0)
    assert [len(es) for es in box.take(now=1.0)] == [P.BATCH_MAX_TASKS, 1]
