"""A network partition between one agent and the broker, then healed (RELIABILITY B7).

The agent reaches the broker through a TCP proxy on 127.0.0.2 that stops
moving bytes for a while and then lets the queued ones through, as TCP does
across a real partition. Everything stays on loopback.
"""

from __future__ import annotations

import time

import pytest
import tasks
from proxy import PartitionProxy

from zpar.testing import wait_for
from zpar.testing.ledger import Ledger, check

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_partitioned_agent_is_dropped_its_tasks_rerun_and_it_rejoins_once_healed(new_cluster, tmp_path):
    cluster = new_cluster(agents=1, workers=1)
    proxy = PartitionProxy("127.0.0.2", "127.0.0.1", cluster.ports[1:])
    try:
        cluster.add_agent(host="127.0.0.2", name="far")
        client = cluster.client()
        ledger = Ledger()
        futures = [ledger.track(i, client.submit(tasks.logged_square, str(tmp_path), i, 0.02)) for i in range(200)]
        wait_for(lambda: any(n["name"] == "far" and n["running"] for n in cluster.status()["nodes"]), 10,
                 what="the far agent holding tasks")
        proxy.partition()
        cut = time.monotonic()
        wait_for(lambda: all(n["name"] != "far" for n in cluster.status()["nodes"]), 5, 0.01,
                 "the partitioned agent dropped")
        detected = time.monotonic() - cut
        assert detected <= 4 * cluster.heartbeat + 0.2, f"detected after {detected:.2f} s"
        results = [f.result(timeout=60) for f in futures]  # the near agent finishes everything
        assert results == [i * i for i in range(200)]
        proxy.heal()
        report = check(ledger, {i: i * i for i in range(200)}, tmp_path)
        assert report.ok and report.completed == 200, report.summary()
        wait_for(lambda: any(n["name"] == "far" for n in cluster.status()["nodes"]), 10,
                 what="the healed agent registered again")
        assert list(client.map(tasks.square, range(100), timeout=30)) == [i * i for i in range(100)]
        counters = cluster.status()["counters"]
        assert counters["done"] >= 300 and counters.get("requeued", 0) >= 1
    finally:
        proxy.close()
