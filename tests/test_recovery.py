"""Nothing lost: retries, timeouts, cancel, recycling, drain, and broker or producer deaths.

Each test runs a cluster of its own (real processes on TCP loopback, 0.1 s
heartbeats) and checks one promise of DESIGN.md "What a user can count on".
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import tasks

import zpar
from zpar.testing import wait_for
from zpar.testing.ledger import Ledger, check

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_task_past_its_timeout_fails_with_task_timeout_and_its_worker_is_replaced(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client()
    (old,) = cluster.worker_pids()
    start = time.monotonic()
    fut = client.options(timeout=0.5).submit(tasks.sleep_square, 3, 30)
    with pytest.raises(zpar.TaskTimeout, match=r"timeout of 0\.5 s"):
        fut.result(timeout=10)
    assert time.monotonic() - start < 2.5
    assert isinstance(fut.exception(), concurrent.futures.TimeoutError)
    wait_for(lambda: [p for p in cluster.worker_pids() if p != old], 10, what="a new worker")
    assert client.submit(tasks.square, 4).result(timeout=10) == 16
    assert cluster.status()["counters"].get("retried", 0) == 0, "a timed-out task must not run again"


def test_options_never_take_the_tasks_own_keyword_arguments(cluster_client):
    def echo(timeout, retries):
        return (timeout, retries)

    assert cluster_client.options(timeout=5, retries=1).submit(echo, timeout="t", retries="r").result(10) == ("t", "r")
    assert cluster_client.submit(echo, timeout=1, retries=2).result(10) == (1, 2)


def test_a_forced_cancel_stops_a_running_task(new_cluster, tmp_path):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client()
    (old,) = cluster.worker_pids()
    fut = client.submit(tasks.sleep_square, 2, 30)
    wait_for(lambda: cluster.status()["busy"] >= 1, 10, what="the task running")
    start = time.monotonic()
    assert client.cancel([fut], force=True) == 1
    assert fut.cancelled()
    wait_for(lambda: old not in cluster.worker_pids(), 5, what="the worker stopped")
    assert time.monotonic() - start < 1.5
    assert client.submit(tasks.square, 5).result(timeout=10) == 25
    assert cluster.status()["counters"].get("retried", 0) == 0


def test_a_poison_task_fails_after_its_retries_and_the_others_complete(new_cluster):
    cluster = new_cluster(agents=1, workers=2)
    client = cluster.client()
    start = time.monotonic()
    futures = [client.submit(tasks.die_at, i, 7, "kill") for i in range(100)]
    with pytest.raises(zpar.WorkerLost, match="gave up after 4 attempts"):
        futures[7].result(timeout=30)
    assert time.monotonic() - start < 5.0
    assert [f.result(timeout=30) for i, f in enumerate(futures) if i != 7] == [i * i for i in range(100) if i != 7]
    wait_for(lambda: len(cluster.worker_pids()) == 2, 10, what="both workers back")


def test_a_broker_restarted_on_the_same_ports_loses_nothing(new_cluster, tmp_path):
    cluster = new_cluster(agents=2, workers=1)
    client = cluster.client()
    ledger = Ledger()
    futures = [ledger.track(i, client.submit(tasks.logged_square, str(tmp_path), i, 0.01)) for i in range(300)]
    wait_for(lambda: sum(f.done() for f in futures) >= 20, 20, what="some results in")
    cluster.broker.kill()
    cluster.broker.wait()
    cluster.start_broker()
    concurrent.futures.wait(futures, timeout=60)
    report = check(ledger, {i: i * i for i in range(300)}, tmp_path)
    assert report.ok and report.completed == 300, report.summary()
    # re-runs only of what the dead broker held: at most one extra run each
    assert set(report.executions) <= {1, 2}, report.summary()
    assert client.submit(tasks.square, 6).result(timeout=20) == 36


def test_the_tasks_own_exception_is_retried_only_when_asked(cluster_client, tmp_path):
    with pytest.raises(ConnectionError, match="flaky call 1"):
        cluster_client.submit(tasks.flaky, str(tmp_path / "a"), 2, "ok").result(timeout=10)
    retrying = cluster_client.options(retry_on=(ConnectionError,), retries=3)
    assert retrying.submit(tasks.flaky, str(tmp_path / "b"), 2, "ok").result(timeout=10) == "ok"
    with pytest.raises(ConnectionError, match="flaky call 3"):
        cluster_client.options(retry_on=(ConnectionError,), retries=2).submit(
            tasks.flaky, str(tmp_path / "c"), 5, "ok").result(timeout=10)


def test_a_result_that_cannot_be_unpickled_here_fails_its_future_naming_it(cluster_client):
    with pytest.raises(zpar.SerializationError, match="cannot unpickle the result of task"):
        cluster_client.submit(tasks.return_loads_nowhere).result(timeout=10)
    assert cluster_client.submit(tasks.square, 7).result(timeout=10) == 49


def test_a_broker_gone_past_broker_timeout_fails_pending_futures_with_broker_unavailable(new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    client = cluster.client(broker_timeout=1.0)
    fut = client.submit(tasks.sleep_square, 1, 30)
    wait_for(lambda: cluster.status()["busy"] >= 1, 10, what="the task running")
    cluster.broker.kill()
    cluster.broker.wait()
    start = time.monotonic()
    with pytest.raises(zpar.BrokerUnavailable, match="has not answered"):
        fut.result(timeout=10)
    assert time.monotonic() - start < 3.0


def test_a_silent_agent_is_dropped_within_four_heartbeats_and_fenced_when_it_returns(new_cluster):
    cluster = new_cluster(agents=2, workers=1)
    client = cluster.client()
    victim = cluster.agents[0]
    futures = [client.submit(tasks.sleep_square, i, 0.05) for i in range(60)]
    wait_for(lambda: cluster.status()["busy"] >= 2, 10, what="both agents busy")
    os.kill(victim.pid, signal.SIGSTOP)
    for pid in cluster.worker_pids(victim):
        os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(lambda: len(cluster.status()["nodes"]) == 1, 5, 0.01, "the silent agent dropped")
        detected = time.monotonic() - stopped
        assert detected <= 4 * cluster.heartbeat + 0.2, f"detected after {detected:.2f} s"
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(60)]
    finally:
        for pid in [victim.pid, *cluster.worker_pids(victim)]:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: len(cluster.status()["nodes"]) == 2, 10, what="the agent back, registered anew")
    assert list(client.map(tasks.square, range(50), timeout=30)) == [i * i for i in range(50)]


def test_workers_are_recycled_after_max_tasks_per_worker(new_cluster):
    cluster = new_cluster(agents=1, workers=1, agent_args=["--max-tasks-per-worker", "3"])
    client = cluster.client()
    pids = [client.submit(tasks.worker_pid).result(timeout=10) for _ in range(9)]  # one at a time, in order
    # three tasks per worker: the pid changes after the 3rd and the 6th
    assert pids[0:3] == [pids[0]] * 3 and pids[3:6] == [pids[3]] * 3 and pids[6:9] == [pids[6]] * 3, pids
    assert len({pids[0], pids[3], pids[6]}) == 3, pids


def test_a_dead_producer_is_forgotten_and_its_work_dropped(new_cluster, tmp_path):
    cluster = new_cluster(agents=1, workers=1)
    script = textwrap.dedent(f"""
        import sys, time, zpar
        c = zpar.Client({cluster.frontend!r})
        fs = [c.submit(time.sleep, 5) for _ in range(1000)]
        print("submitted", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        wait_for(lambda: cluster.status()["queued"] > 0, 10, what="its tasks queued")
        proc.kill()
        killed = time.monotonic()
        wait_for(lambda: cluster.status()["producers"] == 0, 5, 0.01, "the producer forgotten")
        assert time.monotonic() - killed <= 6 * cluster.heartbeat + 0.5  # producers: twice the agents liveness
        status = cluster.status()
        assert status["queued"] == 0 and status["running"] == 0
    finally:
        proc.kill()
        proc.wait()
    # its running task was stopped: the worker is free for others at once
    client = cluster.client()
    assert client.submit(tasks.square, 3).result(timeout=5) == 9


def test_first_sigterm_drains_an_agent_second_stops_it(new_cluster):
    cluster = new_cluster(agents=1, workers=1, agent_args=["--grace", "20"])
    client = cluster.client()
    agent = cluster.agents[0]
    fut = client.submit(tasks.sleep_square, 4, 1.0)
    wait_for(lambda: cluster.status()["busy"] >= 1, 10, what="the task running")
    agent.send_signal(signal.SIGTERM)
    assert fut.result(timeout=10) == 16, "the running task finished during the drain"
    assert agent.wait(10) == 0
    assert cluster.status()["counters"].get("requeued", 0) == 0

    second = cluster.add_agent()
    slow = client.submit(tasks.sleep_square, 5, 3.0)
    wait_for(lambda: cluster.status()["busy"] >= 1, 10, what="the slow task running")
    stopping = time.monotonic()
    second.send_signal(signal.SIGTERM)
    second.send_signal(signal.SIGTERM)
    assert second.wait(10) == 0
    assert time.monotonic() - stopping < 5.0, "the second signal did not stop it at once"
    cluster.add_agent()
    assert slow.result(timeout=20) == 25, "the task it handed back ran elsewhere"


def test_a_task_past_the_memory_limit_is_stopped_with_a_clear_error(new_cluster):
    cluster = new_cluster(agents=1, workers=1, agent_args=["--max-memory-per-worker", "200"])
    client = cluster.client()
    fut = client.submit(tasks.hog_memory, 400)
    with pytest.raises(zpar.MemoryLimitExceeded, match="past the hard limit of 300 MiB"):
        fut.result(timeout=20)
    assert client.submit(tasks.hog_memory, 10, 0).result(timeout=20) == 10
    assert cluster.status()["counters"].get("retried", 0) == 0
