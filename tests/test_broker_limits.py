"""What one producer may do to the broker: verified function digests, quotas, O(1) cancel, bounded headers.

BrokerCore and AgentCore's slots with a fake clock (no sockets, no sleeps),
the producer's core through zpar.testing.transport, and one real cluster.
"""

from __future__ import annotations

import time

import msgpack
import pytest

import zpar
from zpar import protocol as P
from zpar.agent.slots import Slots
from zpar.errors import ProtocolError
from zpar.testing.transport import StubBroker
from zpar_broker.core import BrokerCore, Dest
from zpar_broker.limits import Limits

A_BLOB, B_BLOB = b"producer A's function", b"producer B's function"
A_DIGEST = P.digest(A_BLOB)


class Broker:
    def __init__(self, **limits: int) -> None:
        self.now = 0.0
        self.core = BrokerCore(self.now, limits=Limits(**limits))

    def send(self, peer: bytes, msg: P.Message):
        if peer not in self.core._producers:
            self.core.producer_message(self.now, peer, P.Hello(P.Role.PRODUCER))
        return self.core.producer_message(self.now, peer, msg)

    def submit(self, peer: bytes, ids, blob: bytes = A_BLOB, digest: bytes | None = None, size: int = 8,
               ship: bool = True):
        digest = P.digest(blob) if digest is None else digest
        entries = tuple(P.TaskEntry(i, digest, (b"x" * size,)) for i in ids)
        return self.send(peer, P.Submit(entries, (P.Function(digest, blob),) if ship else ()))

    def agent(self, peer: bytes = b"a", credits: int = 0):
        self.core.agent_message(self.now, peer, P.Hello(P.Role.AGENT, "a", "host", 1, 4))
        return self.core.agent_message(self.now, peer, P.Ready(credits)) if credits else []


def errors(out, code: P.ErrorCode) -> list[tuple[bytes, tuple[int, ...]]]:
    return [(o.peer, o.msg.ids) for o in out if isinstance(o.msg, P.Error) and o.msg.code is code]


# ---------------------------------------------------------------------- verified content addressing


def test_a_blob_claiming_another_producers_digest_is_refused_and_theirs_still_runs():
    b = Broker()
    assert b.submit(b"A", [1, 2]) == []
    out = b.submit(b"B", [1], blob=B_BLOB, digest=A_DIGEST)  # B claims A's digest for its own code
    assert errors(out, P.ErrorCode.BAD_FUNCTION) == [(b"B", (1,))]
    assert b.core.counters["functions_mismatched"] == 1 and b"B" in b.core._producers  # B is not cut off
    (tasks,) = [o.msg for o in b.agent(credits=10) if isinstance(o.msg, P.Tasks)]
    assert [t.id for t in tasks.tasks] == [1, 2] and tasks.funcs == (P.Function(A_DIGEST, A_BLOB),)
    assert b.core.status(b.now)["queued"] == 0


def test_a_refused_task_fails_at_the_producer_with_a_clear_error():
    broker = StubBroker()
    broker.welcome()
    fut = broker.submit(divmod, 7, 2)
    (task,) = broker.tasks()
    broker.error(P.ErrorCode.BAD_FUNCTION, task.id)
    with pytest.raises(zpar.ProtocolError, match="does not hash to its digest"):
        fut.result(0)


def test_the_agent_refuses_a_blob_that_does_not_match_its_digest():
    slots = Slots("node")
    slots.add_worker(b"w")
    forged = P.Tasks((P.TaskEntry(1, A_DIGEST, (b"args",)),), (P.Function(A_DIGEST, B_BLOB),))
    assert slots.tasks(forged, 0.0) == []
    assert A_DIGEST not in slots.funcs
    (lost,) = slots.results
    assert lost.id == 1 and lost.status is P.Status.LOST and "does not hash" in lost.cause.detail
    honest = P.Tasks((P.TaskEntry(2, A_DIGEST, (b"args",)),), (P.Function(A_DIGEST, A_BLOB),))
    slots.tasks(honest, 0.0)
    assert slots.funcs[A_DIGEST] == A_BLOB


# ---------------------------------------------------------------------- quotas


def test_tasks_past_the_queued_quota_are_refused_for_now_and_other_producers_are_not():
    b = Broker(queued_tasks=3)
    out = b.submit(b"p", range(1, 6))
    (err,) = [o.msg for o in out if isinstance(o.msg, P.Error)]
    assert err.code is P.ErrorCode.QUEUE_FULL and err.ids == (4, 5) and "3 of its tasks are queued" in err.detail
    assert b.submit(b"q", range(1, 4)) == []  # another producer has its own quota
    assert b.core.status(b.now)["queued"] == 6
    assert b.core.counters["refused_queue_full"] == 2
    b.agent(credits=3)  # three of them go: room again
    assert sum(p.queued for p in b.core._producers.values()) == 3
    assert errors(b.submit(b"p", [6]), P.ErrorCode.QUEUE_FULL) == []


def test_tasks_past_the_queued_bytes_quota_are_refused_for_now():
    b = Broker(queued_bytes=1000)
    out = b.submit(b"p", range(1, 5), size=400)
    assert errors(out, P.ErrorCode.QUEUE_FULL) == [(b"p", (3, 4))]
    assert b.core._producers[b"p"].queued_bytes == 800


def test_a_task_larger_than_the_bytes_quota_still_goes_alone():
    b = Broker(queued_bytes=100)
    assert b.submit(b"p", [1], size=500) == []


def test_objects_sent_to_queued_channel_tasks_count_in_the_bytes_quota_and_past_it_fail_that_task():
    b = Broker(queued_bytes=1000)
    entries = tuple(P.TaskEntry(i, A_DIGEST, (b"x" * 8,), P.FLAG_CHANNEL) for i in (1, 2))
    b.send(b"A", P.Submit(entries, (P.Function(A_DIGEST, A_BLOB),)))
    assert b.send(b"A", P.Feed((P.ItemEntry(1, 0, (b"o" * 500,)),))) == []  # kept with the queued task
    assert b.core._producers[b"A"].queued_bytes == 16 + 500
    out = b.send(b"A", P.Feed((P.ItemEntry(2, 0, (b"o" * 600,)),)))  # past the quota: task 2 fails, alone
    assert errors(out, P.ErrorCode.QUOTA_EXCEEDED) == [(b"A", (2,))]
    assert b.core.status(b.now)["queued"] == 1 and b.core._producers[b"A"].queued_bytes == 8 + 500
    (tasks, feed) = [o.msg for o in b.agent(credits=10) if isinstance(o.msg, P.Tasks | P.Feed)]
    assert [t.id for t in tasks.tasks] == [1] and [bytes(i.payload[0]) for i in feed.items] == [b"o" * 500]
    assert b.core._producers[b"A"].queued_bytes == 0  # what went with the task no longer counts


def test_objects_past_a_producers_window_for_a_queued_task_are_dropped():
    b = Broker()
    b.send(b"A", P.Submit((P.TaskEntry(1, A_DIGEST, (b"x",), P.FLAG_CHANNEL),), (P.Function(A_DIGEST, A_BLOB),)))
    big = P.STREAM_BYTES
    b.send(b"A", P.Feed(tuple(P.ItemEntry(1, seq, (b"o" * big,)) for seq in range(4))))
    assert b.core.counters["feed_over_window"] == 2  # the first goes whatever its size; then 2 x STREAM_BYTES


def test_function_blobs_past_the_quota_are_refused_while_in_use_and_evicted_when_idle():
    b = Broker(functions=2)
    blobs = [b"f%d" % i for i in range(3)]
    assert b.submit(b"p", [1], blob=blobs[0]) == [] and b.submit(b"p", [2], blob=blobs[1]) == []
    out = b.submit(b"p", [3], blob=blobs[2])
    assert errors(out, P.ErrorCode.QUEUE_FULL) == [(b"p", (3,))]  # for now: blobs in use free up
    (tasks,) = [o.msg for o in b.agent(credits=2) if isinstance(o.msg, P.Tasks)]
    b.core.results(b.now, P.Result((P.ResultEntry(tasks.tasks[0].id, P.Status.OK, (b"r",)),), b"a"))
    assert b.submit(b"p", [4], blob=blobs[2]) == []  # the idle blob made room
    funcs = b.core._producers[b"p"].funcs
    assert len(funcs) == 2 and P.digest(blobs[0]) not in funcs
    # The producer believes the broker still has it: told UNKNOWN_FUNCTION, it sends it again.
    out = b.submit(b"p", [5], blob=blobs[0], ship=False)
    assert errors(out, P.ErrorCode.UNKNOWN_FUNCTION) == [(b"p", (5,))]


def test_a_function_blob_larger_than_the_bytes_quota_is_refused_for_good():
    b = Broker(function_bytes=10)
    assert errors(b.submit(b"p", [1], blob=b"x" * 11), P.ErrorCode.QUOTA_EXCEEDED) == [(b"p", (1,))]


def test_a_task_refused_for_good_fails_at_the_producer_with_quota_exceeded():
    broker = StubBroker()
    broker.welcome()
    fut, other = broker.submit(divmod, 7, 2), broker.submit(divmod, 9, 2)
    first, _ = broker.tasks()
    broker.send(P.Error(P.ErrorCode.QUOTA_EXCEEDED, (first.id,), "its function blob is over the broker's limit"))
    with pytest.raises(zpar.QuotaExceeded, match="function blob is over"):
        fut.result(0)
    assert not other.done()


def test_a_task_the_broker_has_no_room_for_is_held_and_sent_again_as_results_come_back():
    broker = StubBroker()
    broker.welcome()
    futures = [broker.submit(divmod, i, 2) for i in range(3)]
    first, second, third = broker.tasks()
    broker.send(P.Error(P.ErrorCode.QUEUE_FULL, (second.id, third.id), "2 of its tasks are queued"))
    assert not any(f.done() for f in futures) and broker.tasks() == []  # held, not failed
    broker.result(first.id, divmod(0, 2))  # one result: room for one more
    assert [t.id for t in broker.tasks()] == [second.id]
    broker.advance(1.0)  # and at each heartbeat, in case no result comes
    assert [t.id for t in broker.tasks()] == [third.id]
    broker.result(second.id, divmod(1, 2))
    broker.result(third.id, divmod(2, 2))
    assert [f.result(0) for f in futures] == [divmod(i, 2) for i in range(3)]


# ---------------------------------------------------------------------- cancel


def test_cancelling_16000_queued_tasks_is_fast_and_status_adds_up():
    b = Broker()
    ids = range(1, 16_001)
    for start in range(0, 16_000, 1000):
        b.submit(b"p", ids[start:start + 1000])
    b.submit(b"q", [1, 2])
    began = time.perf_counter()
    for start in range(0, 16_000, P.MAX_ENTRIES):
        b.send(b"p", P.Cancel(tuple(ids[start:start + P.MAX_ENTRIES])))
    took = time.perf_counter() - began
    assert took < 0.5, f"cancelling 16,000 queued tasks took {took:.3f} s"
    s = b.core.status(b.now)
    assert s["queued"] == 2 and s["running"] == 0 and b.core.counters["cancelled"] == 16_000
    assert len(b.core._producers[b"p"].queue) == 0  # tombstones compacted away
    (tasks,) = [o.msg for o in b.agent(credits=10) if isinstance(o.msg, P.Tasks)]
    assert len(tasks.tasks) == 2  # only q's, no tombstone dispatched


def test_cancelled_tasks_in_the_middle_of_a_queue_are_skipped_at_dispatch():
    b = Broker()
    b.submit(b"p", range(1, 7))
    b.send(b"p", P.Cancel((2, 4, 5)))
    (tasks,) = [o.msg for o in b.agent(credits=10) if isinstance(o.msg, P.Tasks)]
    assert [b.core._tasks[t.id].ptid for t in tasks.tasks] == [1, 3, 6]


def test_stopping_many_running_tasks_reaches_agents_in_messages_they_accept():
    b = Broker()
    n = P.MAX_ENTRIES + 5
    for start in range(0, n, 1000):
        b.submit(b"p", range(start, min(n, start + 1000)))
    b.core.agent_message(b.now, b"a", P.Hello(P.Role.AGENT, "a", "host", 1, n))
    b.core.agent_message(b.now, b"a", P.Ready(n))
    out = b.send(b"p", P.Bye())  # the producer left: all its running tasks are stopped
    stops = [o.msg for o in out if o.dest is Dest.BACKEND and isinstance(o.msg, P.Cancel)]
    assert sum(len(m.ids) for m in stops) == n
    for m in stops:
        assert P.decode(P.encode(m)) == m


def test_the_producer_splits_a_large_cancel_into_messages_the_broker_accepts():
    broker = StubBroker()
    broker.welcome()
    futs = [broker.submit(divmod, i, 2) for i in range(P.MAX_ENTRIES + 10)]
    broker.tasks()
    for fut in futs:
        fut.cancel()
    cancels = [m for m in broker.turn() if isinstance(m, P.Cancel)]
    assert [len(c.ids) for c in cancels] == [P.MAX_ENTRIES, 10]


# ---------------------------------------------------------------------- headers


def test_a_header_of_millions_of_empty_maps_is_refused_before_they_are_built():
    flat = msgpack.packb([{}] * (P.MAX_HEADER_BYTES - 16))
    nested = msgpack.packb([[{}] * 9000 for _ in range(900)])  # each array within its limit
    for header in (flat, nested):
        began = time.perf_counter()
        with pytest.raises(ProtocolError):
            P.decode([header])
        assert time.perf_counter() - began < 0.1  # ~0.35 s and ~600 MB when they were all built


def test_a_header_declaring_huge_lengths_is_refused():
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                   b"\xdb\x00\xff\xff\xff", b"\xc9\x00\x00\x00\x05\x01abcde"):
        with pytest.raises(ProtocolError):
            P.decode([header])


def test_a_full_batch_still_decodes_within_the_limits():
    entries = tuple(P.TaskEntry(i, A_DIGEST, (b"x" * 100,)) for i in range(P.MAX_ENTRIES))
    assert len(P.decode(P.encode(P.Submit(entries))).tasks) == P.MAX_ENTRIES
    results = tuple(P.ResultEntry(i, P.Status.LOST, cause=P.Cause("n")) for i in range(P.MAX_ENTRIES))
    assert len(P.decode(P.encode(P.Result(results))).results) == P.MAX_ENTRIES


# ---------------------------------------------------------------------- a real cluster


def _big_function(size: int):
    ballast = b"\x00" * size

    def task(x):
        return x + len(ballast) * 0

    return task


@pytest.mark.parametrize("client", ["embedded"], indirect=True)
def test_a_producer_over_its_function_quota_gets_quota_exceeded_while_another_runs(client):
    """The default function_bytes quota (64 MiB): a function of more is refused, and only it."""
    too_big = _big_function(Limits().function_bytes + 1)
    with zpar.Client(client.address) as other:
        refused = other.submit(too_big, 1)
        fine = [client.submit(divmod, i, 3) for i in range(50)]
        with pytest.raises(zpar.QuotaExceeded, match="function blob"):
            refused.result(timeout=60)
        assert [f.result(timeout=30) for f in fine] == [divmod(i, 3) for i in range(50)]
        assert other.submit(divmod, 7, 2).result(timeout=30) == (3, 1)  # its next small task runs
