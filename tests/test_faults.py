"""The failure matrix on a real TCP cluster: each fault has one expected outcome, never a hang.

Tests that kill processes get a cluster of their own (``new_cluster``).
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import socket
import time
import urllib.parse

import msgpack
import psutil
import pytest
import tasks
import zmq

import zpar
from zpar import protocol as P
from zpar import security
from zpar.testing import wait_for

#: Each test here starts a cluster of its own and breaks it; give them room on a busy 2-core box.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_worker_killed_mid_task_is_run_again_and_completes_once(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client()
    (old,) = cluster.worker_pids()
    fut = client.submit(tasks.sleep_square, 3, 1.0)
    wait_for(lambda: cluster.status()["busy"] >= 1, 10, what="the task running")
    os.kill(old, signal.SIGKILL)
    assert fut.result(timeout=20) == 9
    counters = cluster.status()["counters"]
    assert counters["retried"] == 1 and counters["done"] == 1
    assert old not in cluster.worker_pids()


def test_worker_killed_mid_task_with_no_retries_gives_worker_lost_and_is_replaced(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client(retries=0)
    (old,) = cluster.worker_pids()
    fut = client.submit(tasks.sleep_square, 3, 3.0)
    wait_for(lambda: cluster.status()["busy"] >= 1, 10, what="the task running")
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(zpar.WorkerLost) as info:
        fut.result(timeout=10)
    assert time.monotonic() - killed_at < 2.0, "the loss was reported late"
    assert (info.value.signal, info.value.exitcode, info.value.pid) == (signal.SIGKILL, None, old)
    (new,) = wait_for(lambda: [p for p in cluster.worker_pids() if p != old] or None, 10, what="a new worker")
    assert cluster.worker_pids() == [new]
    assert client.submit(tasks.worker_pid).result(timeout=10) == new
    assert cluster.status()["workers"] == 1


@pytest.mark.parametrize("how,ended", [("exit3", (3, None)), ("segv", (None, signal.SIGSEGV)),
                                       ("kill", (None, signal.SIGKILL))])
def test_task_that_kills_its_worker_gives_worker_lost_while_the_others_complete(new_cluster, how, ended):
    cluster = new_cluster(agents=1, workers=2)
    client = cluster.client()
    warm = client.map(tasks.die_at, range(200), [-1] * 200, ["exit3"] * 200)
    assert list(warm) == [i * i for i in range(200)]  # now measured as tiny, so they go in batches
    futures = [client.submit(tasks.die_at, i, 25, how) for i in range(50)]
    for i, fut in enumerate(futures):
        if i == 25:
            with pytest.raises(zpar.WorkerLost) as info:
                fut.result(timeout=30)
            assert (info.value.exitcode, info.value.signal) == ended
        else:
            assert fut.result(timeout=30) == i * i
    results = client.map(tasks.die_at, range(30), [10] * 30, [how] * 30, timeout=30)
    assert [next(results) for _ in range(10)] == [i * i for i in range(10)]
    with pytest.raises(zpar.WorkerLost) as info:
        next(results)
    assert (info.value.exitcode, info.value.signal) == ended
    wait_for(lambda: len(cluster.worker_pids()) == 2, 10, what="both workers replaced")


@pytest.mark.parametrize("target,arg,exitcode,sig", [(tasks.kill_self, signal.SIGKILL, None, 9),
                                                     (tasks.os_exit, 3, 3, None)], ids=["sigkill", "os_exit_3"])
def test_worker_lost_says_how_the_worker_ended_as_data(own_client, target, arg, exitcode, sig):
    with pytest.raises(zpar.WorkerLost) as info:
        own_client.options(retries=0).submit(target, arg).result(timeout=30)
    exc = info.value
    assert (exc.exitcode, exc.signal) == (exitcode, sig)
    assert exc.attempts == 1 and exc.pid > 0 and exc.node
    copy = pickle.loads(pickle.dumps(exc))  # as it crosses a process boundary (Process, pools)
    assert (type(copy), str(copy)) == (zpar.WorkerLost, str(exc))
    assert (copy.node, copy.pid, copy.exitcode, copy.signal, copy.attempts) == \
        (exc.node, exc.pid, exc.exitcode, exc.signal, exc.attempts)


def test_task_calling_sys_exit_raises_system_exit_from_result_and_the_worker_survives(cluster, cluster_client):
    workers = sorted(cluster.worker_pids())
    futures = [cluster_client.submit(tasks.call_sys_exit, 4) for _ in range(4)]
    for fut in futures:
        with pytest.raises(SystemExit) as info:  # as ProcessPoolExecutor raises it
            fut.result(timeout=10)
        assert info.value.code == 4
    assert cluster_client.submit(tasks.square, 6).result(timeout=10) == 36
    assert sorted(cluster.worker_pids()) == workers


def test_agent_killed_with_tasks_in_flight_all_tasks_finish_on_the_other(new_cluster):
    cluster = new_cluster(agents=2, workers=1)
    client = cluster.client()
    futures = [client.submit(tasks.sleep_square, i, 0.1) for i in range(20)]
    wait_for(lambda: cluster.status()["busy"] >= 2, 10, what="both agents busy")
    victim = cluster.agents[0]
    before = cluster.status()["counters"]
    orphans = [psutil.Process(p) for p in cluster.worker_pids(victim)]
    cluster.kill_agent(victim)
    assert victim.wait(5) == -signal.SIGKILL
    assert [f.result(timeout=30) for f in futures] == [i * i for i in range(20)]
    _, alive = psutil.wait_procs(orphans, timeout=5)
    assert not alive, "the dead agent's workers outlived it"
    status = cluster.status()
    assert len(status["nodes"]) == 1
    assert status["counters"]["agents_silent"] == before.get("agents_silent", 0) + 1
    assert status["counters"]["requeued"] > before.get("requeued", 0)


def test_new_agents_are_not_dropped_as_silent_after_joining(new_cluster):
    cluster = new_cluster(agents=1, workers=1, settle=False)
    wait_for(lambda: cluster.status()["uptime_s"] >= 2.0, 10, what="2 s of uptime")
    assert cluster.status()["counters"].get("agents_silent", 0) == 0



# ---------------------------------------------------------------------- garbage


def _host_port(address: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(address.replace("tcp://", "//", 1))
    return parts.hostname, parts.port


#: Multipart messages no decoder accepts.
BAD_MESSAGES = [
    [b"\xc1"],
    [b""],
    [msgpack.packb([1, 6])],
    [msgpack.packb({"v": P.VERSION, "k": 99})],
    [msgpack.packb({"v": 1, "k": 6})],  # an older version
    [msgpack.packb({"v": P.VERSION + 1, "k": 6})],
    [*P.encode(P.Heartbeat()), b"an undeclared frame"],
    [P.encode(P.Hello(P.Role.AGENT))[0][:-2]],
    [msgpack.packb({"v": P.VERSION, "k": int(P.Kind.RESULT), "r": [[1, 0, 0, 0, b"x", ["n", 1, None, 9, 0, ""]]]})],
    [b"\xdd\xff\xff\xff\xff"],
]


def test_garbage_on_every_broker_port_does_not_crash_it(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client()
    before = cluster.status()["counters"].get("protocol_errors", 0)
    rng = random.Random(20261125)
    addresses = [cluster.frontend, cluster.backend, cluster.collector]
    for address in addresses:  # not even a ZMTP greeting: libzmq drops these connections
        for _ in range(5):
            with socket.create_connection(_host_port(address), timeout=5) as raw:
                raw.sendall(rng.randbytes(rng.randint(1, 4096)))
    ctx = zmq.Context.instance()
    sent = 0
    for kind, address, role in ((zmq.DEALER, cluster.frontend, "producer"), (zmq.DEALER, cluster.backend, "agent"),
                                (zmq.PUSH, cluster.collector, "agent")):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 2000)
        security.apply_client(sock, security.client_credentials(role))  # an authenticated peer gone wrong
        sock.connect(address)
        for frames in [*BAD_MESSAGES, [rng.randbytes(64) for _ in range(3)]]:
            sock.send_multipart(frames)
            sent += 1
        sock.close()  # lingers until the queue is out
    wait_for(lambda: cluster.status()["counters"].get("protocol_errors", 0) >= before + sent, 10,
             what=f"{sent} bad messages counted")
    assert cluster.broker.poll() is None
    assert list(client.map(tasks.square, range(100), timeout=30)) == [i * i for i in range(100)]
    assert cluster.status()["workers"] == 1


def test_a_result_with_a_list_as_status_is_dropped_as_a_protocol_error(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    security.apply_client(push, security.client_credentials("agent"))  # an authenticated agent gone wrong
    push.connect(cluster.collector)
    push.send(msgpack.packb({"v": P.VERSION, "k": int(P.Kind.RESULT), "r": [[1, [0], 0, 0, b"x", None]]}))
    push.close()

    def handled():
        if cluster.broker.poll() is not None:
            return True
        try:
            return cluster.status(0.5)["counters"].get("messages_collector", 0) >= 1
        except zpar.BrokerUnavailable:
            return False

    wait_for(handled, 10, what="the message handled")
    assert cluster.broker.poll() is None, f"the broker exited with {cluster.broker.returncode}"
    assert client.submit(tasks.square, 5).result(timeout=10) == 25
    counters = cluster.status()["counters"]
    assert counters.get("protocol_errors", 0) == 1 and counters.get("internal_errors", 0) == 0, counters

