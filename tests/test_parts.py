"""Large arguments as PART messages: split and joined again, kept and forwarded by the broker, passed on by the
agent to the worker that has the task (each hop works on a part while the next hop works on the one before).

The rules with no sockets: zpar.protocol's split and Assembly, BrokerCore with a fake clock, the agent's Slots,
and the producer's core over the stub broker. tests/test_parts_cluster.py runs them over real sockets.
"""

from __future__ import annotations

import numpy
import pytest

from zpar import protocol as P
from zpar import serialize
from zpar.agent.slots import Slots
from zpar.errors import ProtocolError
from zpar.testing.transport import StubBroker
from zpar_broker.core import BrokerCore, Dest
from zpar_broker.limits import Limits

BLOB = b"the function"
D = P.digest(BLOB)
MIB = 1 << 20

pytestmark = pytest.mark.timeout(30)


def big_entry(tid: int = 1, frames: int = 10, size: int = MIB) -> P.TaskEntry:
    """A task whose payload is a head and ``frames`` buffers of ``size`` bytes, each frame its own bytes."""
    payload = (b"head", *(bytes([i % 251]) * size for i in range(frames)))
    return P.TaskEntry(tid, D, payload, 0, 3)


def data(payload) -> bytes:
    return b"".join(bytes(f) for f in payload)


# ---------------------------------------------------------------------- split and Assembly


def test_a_large_payload_splits_at_frame_boundaries_and_joins_to_the_same_frames():
    entry = big_entry(frames=10)
    head, parts = P.split(entry, part_bytes=4 * MIB)
    assert head.payload == (b"head",) and head.parts == len(parts) == 3 and head.part_bytes == 10 * MIB
    assert [p.seq for p in parts] == [0, 1, 2] and [len(p.payload) for p in parts] == [4, 4, 2]
    assembly = P.Assembly(head)
    assert all(assembly.add(p) for p in parts) and assembly.complete
    whole = assembly.whole()
    assert whole.parts == whole.part_bytes == 0
    assert [bytes(f) for f in whole.payload] == [bytes(f) for f in entry.payload]


@pytest.mark.parametrize("entry", [
    P.TaskEntry(1, D, (b"x" * (P.PARTS_FROM + 1),)),  # one frame: nothing to split between
    big_entry(frames=2),  # under PARTS_FROM
], ids=["one frame", "small"])
def test_a_payload_of_one_frame_or_under_the_threshold_is_not_split(entry):
    assert P.split(entry) == (entry, [])


def test_an_assembly_ignores_repeats_and_parts_out_of_order():
    head, parts = P.split(big_entry(frames=12), part_bytes=4 * MIB)
    assembly = P.Assembly(head)
    assert not assembly.add(parts[1])  # a gap: ignored (its sender sends the task again, all its parts too)
    assert assembly.add(parts[0]) and not assembly.add(parts[0])  # a repeat: ignored
    assert assembly.add(parts[1]) and assembly.add(parts[2]) and assembly.complete


def joined(*parts: P.Part) -> P.Part:
    return P.Part(parts[0].id, parts[0].seq, tuple(f for p in parts for f in p.payload))


@pytest.mark.parametrize("forge", [
    lambda head, parts: (head._replace(part_bytes=head.part_bytes - 1), parts),  # more bytes than declared
    lambda head, parts: (head._replace(part_bytes=head.part_bytes + 1), parts),  # the last part short
    lambda head, parts: (head._replace(parts=2), [parts[0], joined(parts[1], parts[2]), P.Part(1, 2, (b"more",))]),
    lambda head, parts: (head, [P.Part(1, 0, (b"x",) * P.MAX_TASK_FRAMES)]),  # too many frames for one task
], ids=["bytes past", "last short", "count past", "frames past"])
def test_a_part_past_what_the_entry_declared_is_refused(forge):
    head, parts = forge(*P.split(big_entry(frames=12), part_bytes=4 * MIB))
    assembly = P.Assembly(head)
    for part in parts[:-1]:
        assert assembly.add(part)
    with pytest.raises(ProtocolError):
        assembly.add(parts[-1])


# ---------------------------------------------------------------------- the broker


class Broker:
    def __init__(self, **limits: int) -> None:
        self.core = BrokerCore(0.0, collector="tcp://127.0.0.1:9", limits=Limits(**limits))

    def producer(self, msg, peer: bytes = b"p1"):
        if not self.core.has_producer(peer):
            self.core.producer_message(0.0, peer, P.Hello(P.Role.PRODUCER))
        return self.core.producer_message(0.0, peer, msg)

    def agent(self, peer: bytes, msg):
        return self.core.agent_message(0.0, peer, msg)

    def join(self, peer: bytes, credits: int = 4):
        self.agent(peer, P.Hello(P.Role.AGENT, peer.decode(), "host", 1, 1))
        return self.agent(peer, P.Ready(credits)) if credits else []

    def submit(self, entry: P.TaskEntry, peer: bytes = b"p1"):
        return self.producer(P.Submit((entry,), (P.Function(D, BLOB),)), peer)


def parts_to(out, agent: bytes) -> list[tuple[int, int]]:
    """``[(gid, seq)]`` of the PARTs in ``out`` for ``agent``."""
    return [(o.msg.id, o.msg.seq) for o in out if isinstance(o.msg, P.Part) and o.peer == agent]


def tasks_to(out, agent: bytes) -> list[P.TaskEntry]:
    return [t for o in out if isinstance(o.msg, P.Tasks) and o.peer == agent for t in o.msg.tasks]


def test_the_broker_dispatches_a_task_at_its_head_and_forwards_each_part_as_it_comes():
    b = Broker()
    b.join(b"a1")
    head, parts = P.split(big_entry(), part_bytes=4 * MIB)
    out = b.submit(head)
    (task,) = tasks_to(out, b"a1")
    assert task.parts == 3 and task.part_bytes == 10 * MIB and data(task.payload) == b"head"
    for part in parts:
        assert parts_to(b.producer(part), b"a1") == [(task.id, part.seq)]
    assert b.core.counters["parts"] == 3


def test_parts_that_come_while_the_task_is_queued_follow_its_tasks_message_in_order():
    b = Broker()
    head, parts = P.split(big_entry(), part_bytes=4 * MIB)
    b.submit(head)
    for part in parts[:2]:
        assert b.producer(part) == []  # no agent yet: kept
    out = b.join(b"a1")
    kinds = [type(o.msg) for o in out if o.peer == b"a1"]
    assert kinds == [P.Tasks, P.Part, P.Part]  # the task, then what came of it so far
    gid = tasks_to(out, b"a1")[0].id
    assert parts_to(out, b"a1") == [(gid, 0), (gid, 1)]
    assert parts_to(b.producer(parts[2]), b"a1") == [(gid, 2)]


def test_when_its_agent_dies_mid_transfer_the_next_agent_gets_every_part_come_so_far_then_the_rest():
    b = Broker()
    b.join(b"a1", credits=1)
    head, parts = P.split(big_entry(), part_bytes=4 * MIB)
    gid = tasks_to(b.submit(head), b"a1")[0].id
    b.producer(parts[0])
    b.join(b"a2", credits=0)
    b.agent(b"a1", P.Bye())  # the node leaves: its task goes back to the front of the queue
    out = b.agent(b"a2", P.Ready(1))
    assert [t.id for t in tasks_to(out, b"a2")] == [gid] and parts_to(out, b"a2") == [(gid, 0)]
    out = b.producer(parts[1]) + b.producer(parts[2])
    assert parts_to(out, b"a2") == [(gid, 1), (gid, 2)] and parts_to(out, b"a1") == []


def test_cancelling_a_task_short_of_parts_stops_it_on_its_agent():
    b = Broker()
    b.join(b"a1")
    head, parts = P.split(big_entry(), part_bytes=4 * MIB)
    gid = tasks_to(b.submit(head), b"a1")[0].id
    b.producer(parts[0])
    out = b.producer(P.Cancel((1,)))  # not forced: a running task would finish, but this one waits for parts
    assert [(o.peer, o.msg.ids, o.msg.force) for o in out if isinstance(o.msg, P.Cancel)] == [(b"a1", (gid,), True)]
    assert b.producer(parts[1]) == [] and b.core.counters["parts_dropped"] == 1


def test_a_part_past_its_declaration_is_refused_with_the_task_and_its_agent_stops_it():
    b = Broker()
    b.join(b"a1")
    head, parts = P.split(big_entry(), part_bytes=4 * MIB)
    gid = tasks_to(b.submit(head), b"a1")[0].id
    out = b.producer(P.Part(1, 0, parts[0].payload + parts[1].payload + parts[2].payload + (b"x",)))
    errors = [o.msg for o in out if isinstance(o.msg, P.Error)]
    assert [(e.code, e.ids) for e in errors] == [(P.ErrorCode.MALFORMED, (1,))]
    assert [(o.peer, o.msg.ids) for o in out if isinstance(o.msg, P.Cancel)] == [(b"a1", (gid,))]
    assert b.core.counters["parts_refused"] == 1 and b.core.status(0.0)["running"] == 0


def test_parts_of_unknown_tasks_are_dropped_and_repeats_after_a_resubmission_ignored():
    b = Broker()
    b.join(b"a1")
    assert b.producer(P.Part(99, 0, (b"x",))) == []
    assert b.core.counters["parts_dropped"] == 1
    head, parts = P.split(big_entry(), part_bytes=4 * MIB)
    b.submit(head)
    b.producer(parts[0])
    b.submit(head)  # sent again after a reconnect: the broker has it
    out = b.producer(parts[0]) + b.producer(parts[1])  # ... and its parts from the first
    assert b.core.counters["parts_repeated"] == 1 and len(parts_to(out, b"a1")) == 1


def test_a_parted_task_counts_its_declared_bytes_against_the_queue_quota():
    b = Broker(queued_bytes=12 * MIB)
    head, _ = P.split(big_entry(), part_bytes=4 * MIB)
    b.submit(head)
    assert b.core._producers[b"p1"].queued_bytes == 10 * MIB + len(b"head")
    out = b.submit(head._replace(id=2))
    assert [(o.msg.code, o.msg.ids) for o in out if isinstance(o.msg, P.Error)] == [(P.ErrorCode.QUEUE_FULL, (2,))]
    assert all(o.dest is Dest.FRONTEND for o in out)


# ---------------------------------------------------------------------- the agent


def test_the_agent_gives_a_parted_task_alone_to_a_worker_with_its_parts_so_far_then_passes_each_on():
    slots = Slots("node-1")
    for w in (b"w1", b"w2"):
        slots.add_worker(w)
    head, parts = P.split(big_entry(tid=7), part_bytes=4 * MIB)
    slots.tasks(P.Tasks((head, P.TaskEntry(8, D, (b"small",))), (P.Function(D, BLOB),)), 0.0)
    assert slots.part(parts[0]) == []  # no worker ready yet: kept with the task
    sends = slots.worker_ready(b"w1", 101, 0.0)
    assert [type(s.msg) for s in sends] == [P.Tasks, P.Part] and {s.identity for s in sends} == {b"w1"}
    assert [(t.id, t.parts) for t in sends[0].msg.tasks] == [(7, 3)]  # alone, and still in parts
    assert sends[1].msg is parts[0]
    (other,) = slots.worker_ready(b"w2", 102, 0.0)  # the next worker takes the small task meanwhile
    assert [t.id for t in other.msg.tasks] == [8]
    (on,) = slots.part(parts[1])
    assert on.identity == b"w1" and on.msg is parts[1]
    assert slots.part(parts[1]) == [] and slots.part(P.Part(99, 0, (b"x",))) == []  # a repeat, an unknown task
    assert slots.held() == 2


def test_a_cancelled_or_forgotten_parted_task_takes_no_more_parts():
    slots = Slots("node-1")
    slots.add_worker(b"w1")
    head, parts = P.split(big_entry(tid=7), part_bytes=4 * MIB)
    slots.tasks(P.Tasks((head,), (P.Function(D, BLOB),)), 0.0)
    slots.cancel((7,))
    assert slots.part(parts[0]) == [] and slots.held() == 0
    slots.tasks(P.Tasks((head,), ()), 0.0)
    slots.forget_tasks()
    assert slots.part(parts[0]) == [] and slots.held() == 0


# ---------------------------------------------------------------------- the producer


def test_the_producer_sends_a_large_argument_as_its_entry_then_its_parts():
    broker = StubBroker()
    broker.welcome()
    broker.inbox.clear()
    arg = [numpy.full(3 * MIB, i, dtype=numpy.uint8) for i in range(4)]  # four buffers, a frame each
    broker.submit(len, arg)
    submits, parts = broker.take(P.Submit), broker.take(P.Part)
    (entry,) = [t for s in submits for t in s.tasks]
    assert entry.parts == len(parts) >= 2 and entry.part_bytes == sum(P.payload_bytes(p.payload) for p in parts)
    assert [p.seq for p in parts] == list(range(len(parts))) and {p.id for p in parts} == {entry.id}
    assembly = P.Assembly(entry)
    for part in parts:
        assembly.add(part)
    ((got,), kwargs) = serialize.loads(assembly.whole().payload)
    assert kwargs == {} and len(got) == 4 and all((a == b).all() for a, b in zip(got, arg, strict=True))
