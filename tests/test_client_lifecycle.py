"""zpar.Client lifetime: cancel, close, connect failures, __main__ code, nothing left behind."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import tasks

import zpar
from zpar.testing import free_port, wait_for

TOPOLOGIES = ["embedded", "tcp"]


@pytest.fixture(params=TOPOLOGIES)
def one_worker(request, new_cluster):
    """A client of a fresh cluster with a single worker, so a task can be held in the broker's queue."""
    if request.param == "embedded":
        client = zpar.Client(workers=1)
    else:
        client = new_cluster(agents=1, workers=1).client()
    try:
        wait_for(lambda: client.status()["workers"] >= 1, 20, what="the worker registered")
        yield client
    finally:
        client.close()


def test_cancelled_queued_task_is_cancelled_and_never_runs(one_worker, gate, tmp_path):
    client = one_worker
    # One worker, and the agent holds at most two tasks (one running, one next): a third waits at the broker.
    blockers = [client.submit(tasks.block_until, gate, 30, i) for i in range(2)]
    marker = tmp_path / "victim-ran"
    victim = client.submit(tasks.touch, str(marker))
    wait_for(lambda: client.status()["queued"] == 1, 15, what="the third task queued at the broker")
    assert victim.cancel() and victim.cancelled()
    wait_for(lambda: (s := client.status())["queued"] == 0 and s["counters"].get("cancelled") == 1, 10,
             what="the broker dropped the cancelled task")
    open(gate, "w").close()
    after = client.submit(tasks.square, 3)  # FIFO: had the victim stayed queued, it would run before this
    assert after.result(timeout=30) == 9
    assert [b.result(timeout=30) for b in blockers] == [0, 1]
    assert not marker.exists()
    with pytest.raises(concurrent.futures.CancelledError):
        victim.result(timeout=0)


def test_closing_cancels_pending_futures(one_worker, gate):
    futures = [one_worker.submit(tasks.block_until, gate) for _ in range(3)]
    one_worker.close()
    assert all(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        one_worker.submit(tasks.noop)
    one_worker.close()  # twice is harmless


def test_embedded_client_closes_cleanly_leaving_no_process():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    client = zpar.Client(workers=1)
    try:
        assert client.submit(tasks.square, 4).result(timeout=20) == 16
        ours = [p for p in me.children(recursive=True) if p.pid not in before]
        [hub] = [p for p in ours if p.ppid() == me.pid]  # broker and agent share a process ...
        assert "zpar_broker.embedded" in hub.cmdline()
        assert [p.name() for p in hub.children()] == ["zpar-worker-w1"]  # ... which forked the worker
        ipc_dir = os.path.dirname(client.address.removeprefix("ipc://"))
        assert os.path.isdir(ipc_dir)
    finally:
        client.close()
    _, alive = psutil.wait_procs(ours, timeout=10)
    assert not alive
    assert not os.path.exists(ipc_dir)
    assert "closed" in repr(client)


def test_no_broker_at_the_address_raises_broker_unavailable_within_connect_timeout():
    threads_before = set(threading.enumerate())
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(zpar.BrokerUnavailable, match=address) as info:
        zpar.Client(address, connect_timeout=1)
    assert 1 <= time.monotonic() - start < 3
    assert isinstance(info.value, ConnectionError) and "zpar-broker" in str(info.value)
    wait_for(lambda: set(threading.enumerate()) <= threads_before, 5, what="the client's I/O thread ended")


def test_workers_option_with_a_remote_address_is_a_config_error():
    with pytest.raises(zpar.ConfigError, match="workers"):
        zpar.Client("tcp://127.0.0.1:1", workers=2)
    with pytest.raises(zpar.ConfigError, match="window"):
        zpar.Client("tcp://127.0.0.1:1", window=0)


SCRIPT = textwrap.dedent("""
    import os, sys, zpar

    def cube(x):
        return x ** 3

    class Point:
        def __init__(self, x):
            self.x = x

    def norm(p):
        return abs(p.x)

    if __name__ == "__main__":
        client = zpar.Client(workers=1)  # not closed: atexit must clean up
        print("pid", os.getpid(), flush=True)
        if sys.argv[1] == "function":
            print("result", list(client.map(cube, range(5))))
        else:
            print("result", client.submit(norm, Point(-3)).result(timeout=20))
""")


def run_script(tmp_path, what: str) -> dict[str, str]:
    """Run SCRIPT as ``__main__``; its output lines by first word. Checks its cluster died with it."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), what], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)

    def leftovers():
        return [p for p in psutil.process_iter(["cmdline"])
                if "--parent-pid" in (p.info["cmdline"] or []) and lines.get("pid") in p.info["cmdline"]]

    wait_for(lambda: not leftovers(), 10, what="the script's cluster exited with it")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return lines


def test_function_defined_in_main_runs_and_nothing_outlives_the_script(tmp_path):
    assert run_script(tmp_path, "function")["result"] == "[0, 1, 8, 27, 64]"


def test_instance_of_a_class_defined_in_main_travels_as_an_argument(tmp_path):
    assert run_script(tmp_path, "instance")["result"] == "3"


def test_embedded_worker_that_dies_gives_worker_lost_and_is_replaced():
    # The embedded cluster's broker and agent share one process: the death of a
    # worker crosses the in-process link, not the collector socket.
    with zpar.Client(workers=1) as client:
        old = client.submit(tasks.worker_pid).result(timeout=20)
        with pytest.raises(zpar.WorkerLost) as info:
            client.submit(tasks.die_at, 5, 5, "exit3").result(timeout=20)
        assert (info.value.exitcode, info.value.signal) == (3, None)
        new = client.submit(tasks.worker_pid).result(timeout=20)
        assert new != old
        assert list(client.map(tasks.square, range(100), timeout=20)) == [i * i for i in range(100)]


def test_a_task_with_too_many_buffers_is_refused_at_submit(cluster_client, monkeypatch):
    from zpar import protocol as P

    monkeypatch.setattr(P, "MAX_TASK_FRAMES", 3)
    import numpy as np

    buffers = [np.zeros(64 * 1024, dtype=np.uint8) for _ in range(5)]  # each one out of band
    with pytest.raises(zpar.PayloadTooLarge, match="fit in a task"):
        cluster_client.submit(len, buffers)


def test_a_message_of_too_many_frames_is_dropped_and_the_broker_serves_on(cluster, cluster_client):
    import zmq

    from zpar import protocol as P
    from zpar import security

    before = cluster.status()["counters"].get("protocol_errors_frontend", 0)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.apply_client(sock, security.client_credentials("producer"))  # a producer of this user gone wrong
    sock.connect(cluster.frontend)
    try:
        sock.send_multipart([b"x"] + [b""] * (P.MAX_FRAMES + 5))
        wait_for(lambda: cluster.status()["counters"].get("protocol_errors_frontend", 0) > before, 10,
                 what="the oversized message counted")
    finally:
        sock.close()
    assert cluster_client.submit(tasks.square, 8).result(timeout=10) == 64
