"""The broker's task history: ``zpar tasks`` and /api/tasks list the tasks that ended, with where, how, how long
and why not; read from a real broker, agents and workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import tasks

import zpar
from zpar import protocol as P
from zpar_broker.telemetry import History

pytestmark = pytest.mark.timeout(60)

BIN = os.path.dirname(sys.executable)


def zpar_tasks(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "zpar"), "tasks", "--broker", cluster.frontend, *args],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "250"})


@pytest.fixture
def worked(new_cluster):
    """Two agents of one worker; five squares, one task that raises, one whose worker dies (no retry)."""
    cluster = new_cluster(agents=2, workers=1)
    with cluster.client() as client:
        assert [client.submit(tasks.square, i).result(30) for i in range(5)] == [0, 1, 4, 9, 16]
        with pytest.raises(ValueError, match="wrong input"):
            client.submit(tasks.raise_value_error, "wrong input").result(30)
        with pytest.raises(zpar.WorkerLost):
            client.options(retries=0).submit(tasks.die_at, 3, 3, "kill").result(30)
    return cluster


def test_zpar_tasks_lists_the_ended_tasks_newest_first_with_where_how_and_why(worked):
    done = zpar_tasks(worked, "--json")
    assert done.returncode == 0, done.stderr
    history = json.loads(done.stdout)
    assert [t["outcome"] for t in history] == ["lost", "raised", *["ok"] * 5]
    assert [t["function"] for t in history] == ["tasks.die_at", "tasks.raise_value_error", *["tasks.square"] * 5]
    nodes = {n["name"] for n in worked.status()["nodes"]}
    pids = set(worked.worker_pids())
    for task in history[1:]:
        assert task["node"] in nodes and task["duration_s"] >= 0 and task["time"] <= time.time()
        assert 0 < task["submitted"] <= task["dispatched"] <= task["time"]  # its life at the broker
    ran = pids | {history[0]["worker"]}  # the workers there now, and the one that died
    assert all(t["worker"] in ran for t in history)
    raised = history[1]
    assert "ValueError: wrong input" in raised["error"] and "raise_value_error" in raised["error"]
    assert raised["worker"] > 0
    lost = history[0]
    assert lost["error"], lost  # why: the worker's end, as the agent saw it
    assert lost["worker"] > 0 and lost["worker"] not in pids  # the one that died
    assert len({t["producer"] for t in history}) == 1 and len({t["task"] for t in history}) == 7


def test_failed_only_and_the_table(worked):
    done = zpar_tasks(worked, "--failed", "--json")
    assert [t["outcome"] for t in json.loads(done.stdout)] == ["lost", "raised"]
    table = zpar_tasks(worked, "--limit", "3")
    assert table.returncode == 0, table.stderr
    assert "ValueError: wrong input" in table.stdout and "tasks.die_at" in table.stdout
    assert table.stdout.count("tasks.square") == 1  # three rows: lost, raised, the last square


def test_the_dashboard_serves_the_same_history(worked):
    parts = urllib.parse.urlsplit(worked.status()["dashboard"])
    token = urllib.parse.parse_qs(parts.query)["token"][0]
    url = f"{parts.scheme}://{parts.netloc}/api/tasks?failed=1&limit=1"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310 - http://
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
        (task,) = json.loads(reply.read())
    assert task["outcome"] == "lost" and task["function"] == "tasks.die_at"


def test_the_ring_keeps_the_latest_and_filters_failures():
    ring = History(size=3)
    for i, outcome in enumerate(["ok", "raised", "ok", "lost", "ok"]):
        ring.add(float(i), "p", i, "f", "n", 10 + i, outcome, 1000 * i, 0, "" if outcome == "ok" else "why")
    assert [t["task"] for t in ring.recent()] == [4, 3, 2]
    assert [t["task"] for t in ring.recent(failed=True)] == [3]
    assert ring.recent(limit=1)[0] == {"time": 4.0, "producer": "p", "task": 4, "function": "f", "node": "n",
                                       "worker": 14, "outcome": "ok", "duration_s": 0.004, "attempts": 0,
                                       "error": "", "submitted": 0.0, "dispatched": 0.0}


def test_a_result_carries_its_worker_and_a_failure_its_text_and_a_function_its_name():
    entry = P.ResultEntry(3, P.Status.RAISED, (b"exc",), 12, None, 4321, "Traceback...\nValueError: x")
    (got,) = P.decode(P.encode(P.Result((entry,)))).results
    assert (got.worker, got.error) == (4321, "Traceback...\nValueError: x")
    submit = P.Submit((P.TaskEntry(1, P.digest(b"f"), (b"x",)),), (P.Function(P.digest(b"f"), b"f", "mod.fn"),))
    assert P.decode(P.encode(submit)).funcs[0].name == "mod.fn"
