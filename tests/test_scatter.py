"""Put once, use many: ``Client.scatter`` (``put``) and the Refs tasks take, on the embedded cluster and over TCP.

What is observed is real: the broker's status (``objects``: what it holds for
producers; per node ``objects``, ``object_bytes``, ``objects_sent``), and what
a worker holds (``zpar._refs.held()``, read by a task). The broker's refusals
are checked on its sans-I/O core.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest
import tasks

import zpar
from zpar import _refs
from zpar import protocol as P
from zpar.testing import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # these tasks travel by value

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------- tasks


def total(a, i):
    return float(a.sum()) + i


def nested(args, i):
    return float(args["arrays"][0][1][i]) + args["n"]


def held(_=None):
    return os.getpid(), _refs.held()


def writable(a):
    return a.flags.writeable


def return_ref(r):
    return r


# ---------------------------------------------------------------------- helpers


def nodes_sent(client) -> int:
    return sum(n["objects_sent"] for n in client.status()["nodes"])


def freed(client) -> bool:
    status = client.status()
    return status["objects"]["count"] == 0 and all(n["objects"] == 0 for n in status["nodes"])


# ---------------------------------------------------------------------- behaviour


def test_a_ref_used_by_many_tasks_gives_its_value_to_each(client):
    a = np.arange(300_000, dtype=np.float64)
    ref = client.scatter(a)
    futures = [client.submit(total, ref, i) for i in range(40)]
    assert client.gather(futures, timeout=60) == [float(a.sum()) + i for i in range(40)]
    del ref, futures
    wait_for(lambda: freed(client), 10, what="the object freed")


def test_refs_nested_in_lists_tuples_and_dicts_are_resolved(client):
    a = np.arange(1000, dtype=np.int64)
    ref = client.put(a)  # Ray's name for the same call
    args = {"arrays": [(None, ref)], "n": 5}
    assert client.gather([client.submit(nested, args, i) for i in range(10)], timeout=60) == [i + 5 for i in range(10)]


@pytest.fixture(params=["embedded", "tcp"])
def steady_client(request, new_cluster):
    """A client of a cluster of 2 workers with the daemons' default heartbeat (1 s): on a loaded machine the
    test clusters' 0.1 s lets a node be dropped and registered anew (its counts start again) while 16 MB move."""
    if request.param == "embedded":
        made = zpar.Client(workers=2)
    else:
        made = new_cluster(agents=2, workers=1, heartbeat=1.0).client()
    with made:
        yield made


def test_the_value_travels_once_per_node(steady_client):
    client = steady_client
    before = nodes_sent(client)
    ref = client.scatter(np.ones(2_000_000))  # 16 MB
    assert client.gather([client.submit(total, ref, i) for i in range(60)], timeout=60)[0] == 2_000_000.0
    nodes = client.status()["nodes"]
    assert 1 <= nodes_sent(client) - before <= len(nodes)  # once per node that ran one, never per task
    assert client.status()["objects"]["count"] >= 1  # still held: the Ref lives (on the embedded cluster's host
    # the 16 MB are in shared memory, and the blob only says where)


def test_workers_get_a_read_only_value(client):
    ref = client.scatter(np.zeros(200_000))
    assert client.submit(writable, ref).result(30) is False


def test_dropping_the_ref_frees_it_at_the_broker_the_nodes_and_the_workers(client):
    ref = client.scatter(np.ones(500_000))
    digest = ref.digest
    client.gather([client.submit(total, ref, i) for i in range(20)], timeout=60)
    status = client.status()
    assert status["objects"]["count"] >= 1
    assert any(n["objects"] >= 1 for n in status["nodes"])
    del ref
    gc.collect()
    wait_for(lambda: freed(client), 10, what="the broker and its nodes to let the object go")
    # RELEASE went to each agent, and on to its workers, ahead of these tasks on the same pipes.
    for _, digests in client.gather([client.submit(held) for _ in range(20)], timeout=60):
        assert digest not in digests


def test_release_frees_it_while_the_ref_is_kept(client):
    ref = client.scatter(np.ones(100_000))
    client.submit(total, ref, 0).result(30)
    ref.release()
    wait_for(lambda: freed(client), 10, what="the object freed")
    with pytest.raises(ValueError, match="did not scatter, or one already released"):
        client.submit(total, ref, 0)


def test_a_ref_of_another_client_is_refused_clearly(client):
    with zpar.Client(workers=1) as other:
        ref = other.scatter(np.ones(10))
        with pytest.raises(ValueError, match="this client did not scatter"):
            client.submit(total, ref, 0)


def test_a_ref_that_comes_back_from_a_task_is_detached(client):
    ref = client.scatter([1, 2, 3])
    back = client.submit(return_ref, [ref]).result(30)  # the worker resolved it: the list itself
    assert back == [[1, 2, 3]]
    detached = _refs._resolve(ref.digest)  # what a Ref unpickles to outside a worker
    assert isinstance(detached, _refs.Ref)
    ref.release()  # the same content, while this client held it, would be its own
    with pytest.raises(ValueError, match="did not scatter"):
        client.submit(total, detached, 0)


def test_closing_the_client_frees_its_objects(cluster):
    with cluster.client() as producer, cluster.client() as watcher:
        ref = producer.scatter(np.ones(300_000))
        producer.submit(total, ref, 0).result(30)
        assert watcher.status()["objects"]["count"] >= 1
    with cluster.client() as watcher:
        wait_for(lambda: freed(watcher), 10, what="the closed client's objects freed")


OWN_CLUSTER = (1, 1)


def test_a_worker_killed_mid_task_is_replaced_and_the_retry_gets_the_value(own_client, tmp_path):
    a = np.arange(100_000, dtype=np.float64)
    ref = own_client.scatter(a)
    assert own_client.submit(total, ref, 0).result(30) == float(a.sum())  # the first worker has it
    flag = str(tmp_path / "died")
    assert own_client.submit(tasks.die_once_then_sum, flag, ref).result(60) == float(a.sum())
    assert os.path.exists(flag)


# ---------------------------------------------------------------------- joblib

joblib = pytest.importorskip("joblib")


def row_sum(a, i):
    return float(a[i % a.shape[0]].sum())


LOKY_ROW_SUMS = """
import json
import joblib
import numpy as np

def row_sum(a, i):
    return float(a[i % a.shape[0]].sum())

big = np.random.default_rng(1).random((1000, 300))
with joblib.parallel_config(backend="loky"):
    print(json.dumps(joblib.Parallel(n_jobs=2)(joblib.delayed(row_sum)(big, i) for i in range(40))))
"""


@pytest.fixture(scope="module")
def loky_row_sums():
    """What loky (which memory-maps the 2.4 MB array) gives, from a process of its own: loky keeps its
    workers after a call, and in a child that has exited none of them is ours."""
    done = subprocess.run([sys.executable, "-c", LOKY_ROW_SUMS], capture_output=True, text=True, timeout=60,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_joblib_backend_sends_large_arrays_once_and_matches_loky(steady_client, loky_row_sums):
    import zpar.joblib  # noqa: F401 - registers "zpar"

    client = steady_client

    big = np.random.default_rng(1).random((1000, 300))  # 2.4 MB: over max_nbytes (1 MB)
    before = nodes_sent(client)
    with joblib.parallel_config(backend="zpar", client=client):
        got = joblib.Parallel(n_jobs=2, batch_size=1)(joblib.delayed(row_sum)(big, i) for i in range(40))
    assert got == loky_row_sums
    assert 1 <= nodes_sent(client) - before <= len(client.status()["nodes"])
    wait_for(lambda: freed(client), 10, what="the call's arrays freed at its end")


def test_joblib_backend_with_max_nbytes_none_sends_arrays_with_each_batch(client):
    import zpar.joblib  # noqa: F401 - registers "zpar"

    big = np.ones((500, 600))
    before = nodes_sent(client)
    with joblib.parallel_config(backend="zpar", client=client):
        got = joblib.Parallel(n_jobs=2, max_nbytes=None)(joblib.delayed(row_sum)(big, i) for i in range(10))
    assert got == [600.0] * 10
    assert nodes_sent(client) == before


# ---------------------------------------------------------------------- the broker's refusals (its core)


def _core():
    from zpar_broker.core import BrokerCore

    core = BrokerCore(0.0, collector="tcp://127.0.0.1:9")
    core.producer_message(0.0, b"p", P.Hello(P.Role.PRODUCER))
    return core


def _errors(out):
    return [o.msg for o in out if isinstance(o.msg, P.Error)]


FN = b"function-blob"
FD = P.digest(FN)


def test_broker_refuses_a_task_naming_an_object_it_does_not_hold():
    core = _core()
    task = P.TaskEntry(1, FD, (b"args",), refs=(P.digest(b"nothing"),))
    errors = _errors(core.producer_message(0.0, b"p", P.Submit((task,), (P.Function(FD, FN),))))
    assert [(e.code, e.ids) for e in errors] == [(P.ErrorCode.UNKNOWN_FUNCTION, (1,))]
    assert core.status(0.0)["queued"] == 0


def test_broker_refuses_an_object_whose_blob_does_not_match_its_digest():
    core = _core()
    forged = P.digest(b"the real one")
    task = P.TaskEntry(1, FD, (b"args",), refs=(forged,))
    out = core.producer_message(0.0, b"p", P.Submit((task,), (P.Function(FD, FN), P.Function(forged, b"another"))))
    assert [(e.code, e.ids) for e in _errors(out)] == [(P.ErrorCode.BAD_FUNCTION, (1,))]
    assert core.status(0.0)["objects"]["count"] == 0


def test_broker_refuses_an_object_over_the_producers_quota():
    from zpar_broker.core import BrokerCore
    from zpar_broker.limits import Limits

    core = BrokerCore(0.0, collector="tcp://127.0.0.1:9", limits=Limits(object_bytes=1000))
    core.producer_message(0.0, b"p", P.Hello(P.Role.PRODUCER))
    blob = _refs.pack(bytes(5000))
    d = P.digest(blob)
    task = P.TaskEntry(1, FD, (b"args",), refs=(d,))
    out = core.producer_message(0.0, b"p", P.Submit((task,), (P.Function(FD, FN), P.Function(d, blob))))
    errors = _errors(out)
    assert [(e.code, e.ids) for e in errors] == [(P.ErrorCode.QUOTA_EXCEEDED, (1,))]
    assert "limit of 1000 bytes of scattered objects" in errors[0].detail


def test_broker_keeps_an_object_released_by_its_producer_until_its_tasks_end():
    core = _core()
    blob = _refs.pack(list(range(100)))
    d = P.digest(blob)
    core.producer_message(0.0, b"p", P.Submit((P.TaskEntry(1, FD, (b"a",), refs=(d,)),),
                                              (P.Function(FD, FN), P.Function(d, blob))))
    core.producer_message(0.0, b"p", P.Release((d,)))
    assert core.status(0.0)["objects"]["count"] == 1  # its task is still queued
    core.producer_message(0.0, b"p", P.Cancel((1,)))
    core.producer_message(0.0, b"p", P.Release((d, P.digest(b"never scattered"))))  # unknown: ignored
    assert core.status(0.0)["objects"]["count"] == 0


def test_object_blobs_are_told_apart_from_functions_and_unpack_without_copies():
    a = np.arange(100_000, dtype=np.float32)  # out of band (serialize.OOB_THRESHOLD): mapped, not copied
    blob = _refs.pack({"a": a})
    assert _refs.is_object(blob) and not _refs.is_object(FN)
    back = _refs.unpack(blob)["a"]
    assert (back == a).all() and not back.flags.writeable and not back.flags.owndata
    assert (back.ctypes.data - np.frombuffer(blob, np.uint8).ctypes.data) % 64 == 0  # aligned as the frame is


def test_a_scatter_over_the_message_limit_fails_at_once(cluster_client, monkeypatch):
    # Over TCP (on the embedded cluster its buffers go through shared memory: no message carries them).
    monkeypatch.setattr(P, "MAX_MESSAGE_SIZE", 1 << 20)  # the limit, lowered: a 2 MiB value stands for 1 GiB+
    with pytest.raises(zpar.PayloadTooLarge, match="scattered object"):
        cluster_client.scatter(bytes(2 << 20))
