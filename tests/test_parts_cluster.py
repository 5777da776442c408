"""Large task arguments travel as PART messages (zpar.protocol.split), over real processes and sockets.

A payload of PARTS_FROM bytes or more in several frames (a large array over
CurveZMQ is chunked into 1 MiB frames) goes as a SUBMIT with its first frame,
then PARTs of about PART_BYTES: the broker keeps them and forwards each to the
agent holding the task, and sends them all again when it dispatches the task
again. Checked here: right answers (a checksum made in the task equals the
producer's), nothing lost to a killed agent or a restarted broker, a peer
sending bad parts refused without harm to anyone else, and a worker waiting for
parts that will never come freed. The broker's status
counters (``parts``, ``parts_dropped``, ``parts_repeated``, ``parts_refused``)
show what it did.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import time
import uuid

import cloudpickle
import numpy as np
import pytest
import tasks
import zmq

from zpar import protocol as P
from zpar import serialize
from zpar.testing import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # these tasks travel by value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MIB = 1 << 20


# ---------------------------------------------------------------------- tasks and helpers


def checksum(array):
    """The SHA-256 of an array's bytes: any part lost, repeated or out of order changes it."""
    return hashlib.sha256(np.ascontiguousarray(array)).hexdigest()


def gated_checksum(gate, array):
    """Leaves ``{gate}.started.<pid>.<random>`` (it has all its parts and runs), waits for the file ``gate``,
    then returns ``(pid, checksum(array))``."""
    with open(f"{gate}.started.{os.getpid()}.{uuid.uuid4().hex}", "w"):
        pass
    tasks.block_until(gate)
    return os.getpid(), checksum(array)


def big_array(mib, seed):
    """``mib`` MiB of random bytes: every part differs from the others."""
    return np.random.default_rng(seed).integers(0, 256, mib * MIB, dtype=np.uint8)


def parts_of(*args):
    """How many PARTs a submit of ``args`` makes over CurveZMQ (where the Client chunks large buffers)."""
    frames = serialize.dumps((args, {}), chunk=True)
    return len(P.split(P.TaskEntry(1, b"", tuple(frames)))[1])


def counter(cluster, name):
    return cluster.status()["counters"].get(name, 0)


def starts(gate):
    """``[pid, ...]`` of each run of gated_checksum so far."""
    return [int(path.rsplit(".", 2)[1]) for path in glob.glob(f"{gate}.started.*")]


# ---------------------------------------------------------------------- right answers


def test_a_large_argument_travels_in_parts_and_arrives_whole(cluster, cluster_client):
    array = big_array(24, 1)
    expected = parts_of(array)
    assert expected >= 5, "the argument must be large enough to travel in several parts"
    before = counter(cluster, "parts")
    assert cluster_client.submit(checksum, array).result(timeout=30) == checksum(array)
    assert counter(cluster, "parts") == before + expected


def test_several_large_arguments_at_once_through_map(cluster, cluster_client):
    arrays = [big_array(12, seed) for seed in range(4)]
    expected = sum(parts_of(a) for a in arrays)
    assert expected >= 2 * len(arrays)
    before = counter(cluster, "parts")
    results = list(cluster_client.map(checksum, arrays, chunksize=1, timeout=60))
    assert results == [checksum(a) for a in arrays]
    assert counter(cluster, "parts") == before + expected


def test_a_large_argument_in_one_burst_with_small_ones(cluster, cluster_client):
    array = big_array(20, 2)
    before = counter(cluster, "parts")
    small_before = [cluster_client.submit(tasks.square, i) for i in range(20)]
    big = cluster_client.submit(checksum, array)
    small_after = [cluster_client.submit(tasks.square, i) for i in range(20, 40)]
    assert [f.result(timeout=30) for f in small_before + small_after] == [i * i for i in range(40)]
    assert big.result(timeout=30) == checksum(array)
    assert counter(cluster, "parts") == before + parts_of(array)  # the small ones travel whole


def test_a_parted_task_queued_behind_busy_workers_gets_its_parts_when_it_starts(cluster, cluster_client, gate):
    busy = [cluster_client.submit(tasks.block_until, gate, 30, i) for i in range(cluster.status()["workers"])]
    wait_for(lambda: cluster.status()["busy"] == len(busy), 10, what="every worker busy")
    array = big_array(16, 6)
    before = counter(cluster, "parts")
    fut = cluster_client.submit(checksum, array)
    # Every part is in (kept by the broker, or by the agent that queued the task) before any worker is free.
    wait_for(lambda: counter(cluster, "parts") == before + parts_of(array), 30, what="every part at the broker")
    assert not fut.done()
    open(gate, "w").close()
    assert [f.result(timeout=30) for f in busy] == list(range(len(busy)))
    assert fut.result(timeout=30) == checksum(array)


# ---------------------------------------------------------------------- failures


def test_an_agent_killed_holding_a_parted_task_loses_nothing(new_cluster, gate):
    cluster = new_cluster(agents=2, workers=1)
    client = cluster.client()
    array = big_array(24, 3)
    fut = client.submit(gated_checksum, gate, array)
    (first,) = wait_for(lambda: starts(gate), 30, what="the task running with all its parts")
    (victim,) = [a for a in cluster.agents if first in cluster.worker_pids(a)]
    (survivor,) = [a for a in cluster.agents if a is not victim]
    survivor_pids = cluster.worker_pids(survivor)
    requeued = counter(cluster, "requeued")
    cluster.kill_agent(victim)
    victim.wait(5)
    # Run again elsewhere: the broker sent the task again with every part (the worker ran it only once whole).
    wait_for(lambda: any(pid in survivor_pids for pid in starts(gate)), 30, what="the task running on the other")
    open(gate, "w").close()
    assert fut.result(timeout=30) == (survivor_pids[0], checksum(array))
    assert counter(cluster, "requeued") > requeued
    assert client.submit(checksum, array).result(timeout=30) == checksum(array)


def restart_broker(cluster) -> None:
    """Kill the broker and start another on the same ports (a new epoch: it numbers tasks from 1 again)."""
    old = cluster.status()["epoch"]
    cluster.broker.kill()
    cluster.broker.wait()
    cluster.start_broker()
    wait_for(lambda: cluster.status()["epoch"] != old, 20, what="the new broker answering")


def test_a_restarted_broker_gets_the_parted_task_again_from_the_client(new_cluster, gate, tmp_path):
    cluster = new_cluster(agents=1, workers=2)
    client = cluster.client()
    # Both workers ready and idle, so that the task goes to the agent's first and its new run to the second;
    # then a fresh broker, so that the task is its first (broker task id 1), as its new run is the next one's.
    warm = str(tmp_path / "warm")
    warming = [client.submit(tasks.block_until, warm, 30, i) for i in range(2)]
    wait_for(lambda: cluster.status()["busy"] == 2, 10, what="both workers running")
    open(warm, "w").close()
    assert [f.result(timeout=10) for f in warming] == [0, 1]
    restart_broker(cluster)
    cluster.wait_for_workers(2)
    array = big_array(24, 4)
    fut = client.submit(gated_checksum, gate, array)
    wait_for(lambda: starts(gate), 30, what="the task running with all its parts")
    restart_broker(cluster)
    # The client sends the task again, parts and all, to the new broker; the agent runs it on its other
    # worker (the first still runs the old broker's run) once it is whole.
    wait_for(lambda: len(starts(gate)) == 2, 10, what="the task running again after the restart")
    assert cluster.status()["counters"].get("parts", 0) == parts_of(gate, array)
    open(gate, "w").close()
    pid, digest = fut.result(timeout=10)
    assert digest == checksum(array) and pid in cluster.worker_pids()
    assert client.submit(checksum, array).result(timeout=30) == checksum(array)


# ---------------------------------------------------------------------- bad parts


class RawProducer:
    """A producer speaking the protocol on a plain DEALER socket (an insecure cluster: no keys needed)."""

    def __init__(self, frontend: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(frontend)
        self.received: list[P.Message] = []
        self.send(P.Hello(P.Role.PRODUCER, "raw-parts-test"))
        self.expect(lambda m: isinstance(m, P.Welcome), "WELCOME")

    def send(self, msg: P.Message) -> None:
        self.sock.send_multipart(P.encode(msg), copy=False)

    def expect(self, match, what: str, timeout: float = 30.0) -> P.Message:
        """The first message received (now or already) that ``match``es; heartbeats meanwhile, so the broker
        keeps us."""
        deadline = time.monotonic() + timeout
        beat = 0.0
        while True:
            for msg in self.received:
                if match(msg):
                    self.received.remove(msg)
                    return msg
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no {what} within {timeout} s; got {self.received!r:.500}")
            if now >= beat:
                self.send(P.Heartbeat())
                beat = now + 0.1
            if self.sock.poll(50):
                msg = P.decode(self.sock.recv_multipart(copy=False))
                if not isinstance(msg, P.Heartbeat):
                    self.received.append(msg)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def _entry(tid: int, fn, *args, retries: int = 0) -> tuple[P.TaskEntry, P.Function]:
    digest, blob = serialize.dump_function(fn)
    frames = serialize.dumps((args, {}), chunk=True)
    return P.TaskEntry(tid, digest, tuple(frames), retries=retries), P.Function(digest, blob)


def test_bad_parts_are_counted_and_refused_and_the_broker_serves_on(new_cluster, gate):
    # Long heartbeats: our raw producer's silences while it builds messages must not get it dropped.
    cluster = new_cluster(agents=1, workers=2, insecure=True, heartbeat=0.5)
    raw = RawProducer(cluster.frontend)
    try:
        # A part for a task that does not exist: dropped.
        raw.send(P.Part(12345, 0, (b"stray",)))
        wait_for(lambda: counter(cluster, "parts_dropped") == 1, 10, what="the stray part dropped")

        # Task 1, whole, its parts sent out of order and repeated: only the next one in order is kept.
        array = big_array(12, 5)
        entry, func = _entry(1, checksum, array)
        head, parts = P.split(entry)
        assert len(parts) == 3
        raw.send(P.Submit((head,), (func,)))
        for seq in (1, 0, 0, 5, 1, 2):
            raw.send(parts[seq] if seq < len(parts) else P.Part(1, seq, (b"beyond",)))
        result = raw.expect(lambda m: isinstance(m, P.Result) and m.results[0].id == 1, "task 1's result")
        (done,) = result.results
        assert done.status == P.Status.OK, done
        assert serialize.loads(done.payload) == checksum(array)
        counters = cluster.status()["counters"]
        assert counters.get("parts") == 3 and counters.get("parts_repeated") == 3, counters

        # Task 2: its last part brings more bytes than its entry declared: refused, named, and the task dropped.
        entry, func = _entry(2, checksum, array)
        head, parts = P.split(entry)
        raw.send(P.Submit((head,), (func,)))
        raw.send(parts[0])
        raw.send(parts[1])
        raw.send(P.Part(2, 2, (*parts[2].payload, b"one byte too many")))
        error = raw.expect(lambda m: isinstance(m, P.Error), "ERROR for task 2")
        assert error.code is P.ErrorCode.MALFORMED and error.ids == (2,), error
        wait_for(lambda: counter(cluster, "parts_refused") == 1, 10, what="the part refused")
        raw.send(parts[2])  # its task is gone: dropped
        wait_for(lambda: counter(cluster, "parts_dropped") == 2, 10, what="a part of the dropped task")

        # Task 3 declares one part, and a second comes while it runs: refused, and the run stopped.
        entry, func = _entry(3, gated_checksum, gate, array)
        head, parts = P.split(entry)
        whole = head._replace(parts=1, part_bytes=sum(P.payload_bytes(p.payload) for p in parts))
        raw.send(P.Submit((whole,), (func,)))
        raw.send(P.Part(3, 0, tuple(f for p in parts for f in p.payload)))
        wait_for(lambda: starts(gate), 30, what="task 3 running")
        raw.send(P.Part(3, 1, (b"a part it never declared",)))
        error = raw.expect(lambda m: isinstance(m, P.Error), "ERROR for task 3")
        assert error.code is P.ErrorCode.MALFORMED and error.ids == (3,), error
        (runner,) = starts(gate)
        wait_for(lambda: runner not in cluster.worker_pids(), 10, what="task 3's run stopped")
        counters = cluster.status()["counters"]
        assert counters.get("parts_refused") == 2 and counters.get("parts") == 3 + 2 + 1, counters
    finally:
        raw.close()

    assert cluster.broker.poll() is None
    client = cluster.client()
    assert client.submit(checksum, array).result(timeout=30) == checksum(array)
    assert list(client.map(tasks.square, range(50), timeout=30)) == [i * i for i in range(50)]
    assert counter(cluster, "internal_errors") == 0


def test_a_producer_gone_between_its_parts_frees_the_worker_waiting_for_them(new_cluster):
    cluster = new_cluster(agents=1, workers=1, insecure=True, heartbeat=0.2)
    (waiting,) = cluster.worker_pids()
    array = big_array(12, 7)
    raw = RawProducer(cluster.frontend)
    try:
        entry, func = _entry(1, checksum, array)
        head, parts = P.split(entry)
        raw.send(P.Submit((head,), (func,)))
        raw.send(parts[0])  # and never the others
        wait_for(lambda: counter(cluster, "parts") == 1 and cluster.status()["busy"] == 1, 10,
                 what="the worker waiting for the other parts")
    finally:
        raw.close()
    # The broker forgets the silent producer and stops its task: the worker waits no more.
    wait_for(lambda: counter(cluster, "producers_silent") == 1, 10, what="the producer forgotten")
    wait_for(lambda: waiting not in cluster.worker_pids(), 10, what="the waiting worker stopped")
    client = cluster.client()
    assert client.submit(checksum, array).result(timeout=30) == checksum(array)
