"""The broker's HTTP side (zpar_broker.web): /api/status and /metrics behind its token, on a real broker.

Each test starts its own broker and agents from their CLIs (LocalCluster, CurveZMQ with this user's secret)
and talks HTTP to the port the broker logs and reports in ``zpar status``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest
import tasks
from prometheus_client.parser import text_string_to_metric_families

from zpar.testing import LocalCluster, wait_for

pytestmark = pytest.mark.timeout(60)


def get(url: str, token: str | None = None, header: bool = False) -> tuple[int, bytes, str]:
    """``(status, body, content type)`` of a GET, the token in the query or in a Bearer header."""
    headers = {}
    if token is not None and header:
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        url = f"{url}?{urllib.parse.urlencode({'token': token})}"
    try:
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - http:// of the broker's own link
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            return reply.status, reply.read(), reply.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def split_link(link: str) -> tuple[str, str]:
    """``(base url, token)`` of the dashboard link in the broker's status."""
    parts = urllib.parse.urlsplit(link)
    return f"{parts.scheme}://{parts.netloc}", urllib.parse.parse_qs(parts.query)["token"][0]


def metrics(base: str, token: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {labels: value}}`` of /metrics, parsed by prometheus-client's own parser."""
    code, body, kind = get(f"{base}/metrics", token, header=True)
    assert code == 200 and kind.startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture
def watched(new_cluster):
    """A broker and two agents of one worker; ``(cluster, base url, token)``."""
    cluster = new_cluster(agents=2, workers=1)
    base, token = split_link(cluster.status()["dashboard"])
    return cluster, base, token


def test_no_token_or_a_wrong_one_gets_401_and_no_data(watched):
    cluster, base, token = watched
    for path in ("/api/status", "/api/tasks", "/api/events", "/metrics", "/api"):
        for given in (None, "", token[:-1] + ("0" if token[-1] != "0" else "1"), token.upper() + "x"):
            code, body, _ = get(base + path, given)
            assert code == 401, (path, given)
            assert b"nodes" not in body and b"zpar_" not in body and cluster.status()["epoch"].encode() not in body


def test_the_status_endpoint_shows_what_zpar_status_shows(watched):
    cluster, base, token = watched
    for header in (False, True):
        code, body, kind = get(f"{base}/api/status", token, header=header)
        assert code == 200 and kind == "application/json"
        info = json.loads(body)
        assert info["epoch"] == cluster.status()["epoch"]
        assert len(info["nodes"]) == 2 and info["workers"] == 2
        assert info["dashboard"].startswith(base)


def test_metrics_count_the_work_done(watched):
    cluster, base, token = watched
    with cluster.client() as client:
        futures = [client.submit(tasks.square, i) for i in range(19)]
        futures.append(client.submit(tasks.raise_value_error, "one of twenty fails"))
        assert [f.result(30) for f in futures[:19]] == [i * i for i in range(19)]
        with pytest.raises(ValueError, match="one of twenty fails"):
            futures[19].result(30)
        m = metrics(base, token)
    assert m["zpar_tasks_submitted_total"][()] == 20
    finished = {dict(labels)["outcome"]: value for labels, value in m["zpar_tasks_finished_total"].items()}
    assert finished["ok"] == 19 and finished["raised"] == 1 and finished["lost"] == 0
    assert m["zpar_task_duration_seconds_count"][()] == 20
    assert m["zpar_tasks_queued"][()] == 0 and m["zpar_tasks_running"][()] == 0
    assert m["zpar_nodes"][()] == 2
    assert sum(m["zpar_workers"].values()) == 2
    assert m["zpar_handshakes_refused_total"][()] == 0
    assert m["zpar_broker_loop_lag_seconds"][()] >= 0


def test_unknown_pages_are_404_and_the_index_lists_the_endpoints(watched):
    _, base, token = watched
    assert get(f"{base}/nope", token)[0] == 404
    code, body, _ = get(f"{base}/api", token)
    assert code == 200
    assert {"/api/status", "/api/tasks", "/api/events", "/metrics"} <= set(json.loads(body)["endpoints"])


def test_the_page_itself_holds_no_data_and_loads_without_the_token(watched):
    cluster, base, _ = watched
    for path, kind in (("/", "text/html"), ("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        code, body, content_type = get(base + path)
        assert code == 200 and content_type.startswith(kind)
        assert cluster.status()["epoch"].encode() not in body


def test_the_token_stays_the_same_across_a_restart_of_the_broker(new_cluster):
    cluster = new_cluster(agents=1, workers=1, broker_args=["--dashboard", f"127.0.0.1:{free_port()}"])
    link = cluster.status()["dashboard"]
    old = cluster.status()["epoch"]
    cluster.broker.terminate()
    cluster.broker.wait()
    cluster.start_broker()
    wait_for(lambda: _epoch(cluster) not in (None, old), 20, what="the new broker answering")
    assert cluster.status()["dashboard"] == link  # derived from its key: a bookmarked link still works
    base, token = split_link(link)
    assert get(f"{base}/api/status", token)[0] == 200


def test_dashboard_off_serves_nothing_and_zpar_status_says_no_link(new_cluster):
    import psutil

    cluster = new_cluster(agents=1, workers=1, broker_args=["--dashboard", "off"])
    assert "dashboard" not in cluster.status()
    listening = {c.laddr.port for c in psutil.Process(cluster.broker.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == set(cluster.ports)  # its three ZeroMQ ports: no HTTP one


def test_a_taken_dashboard_port_given_explicitly_is_an_error_that_says_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "zpar_broker", *(f"--{name}=tcp://127.0.0.1:0" for name in
                               ("frontend", "backend", "collector")), "--dashboard", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in done.stderr and "--dashboard off" in done.stderr


def test_zpar_status_prints_the_link(watched):
    cluster, base, _ = watched
    zpar = os.path.join(os.path.dirname(sys.executable), "zpar")  # the console script, as a user runs it
    out = subprocess.run([zpar, "status", "--broker", cluster.frontend],
                         capture_output=True, text=True, timeout=30, check=True,
                         env={**os.environ, "COLUMNS": "300"}).stdout
    assert f"dashboard: {base}/?token=" in out


def _epoch(cluster: LocalCluster) -> str | None:
    try:
        return cluster.status(1.0)["epoch"]
    except Exception:  # noqa: BLE001 - not up yet
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: object, token: str | None, header: bool = True) -> tuple[int, dict]:
    """``(status, JSON answer)`` of a control."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None and header:
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        url = f"{url}?{urllib.parse.urlencode({'token': token})}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310 - http://
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_controls_need_the_token_in_a_header_and_a_well_formed_body(watched):
    cluster, base, token = watched
    node = cluster.status()["nodes"][0]["name"]
    assert post(f"{base}/api/nodes/drain", {"node": node}, None)[0] == 401
    assert post(f"{base}/api/nodes/drain", {"node": node}, token, header=False)[0] == 401  # a link's token: no
    assert post(f"{base}/api/nodes/workers", {"node": node, "workers": 0}, token)[0] == 400
    assert post(f"{base}/api/nodes/workers", {"node": node}, token)[0] == 400
    assert post(f"{base}/api/nodes/drain", ["not", "an", "object"], token)[0] == 400
    assert post(f"{base}/api/nodes/reboot", {"node": node}, token)[0] == 404
    code, answer = post(f"{base}/api/nodes/drain", {"node": "no-such-node"}, token)
    assert code == 200 and answer == {"ok": False, "result": "no node named 'no-such-node'"}
    assert len(cluster.status()["nodes"]) == 2  # nothing happened


def test_a_node_resized_live_runs_with_its_new_workers_and_loses_nothing(watched):
    cluster, base, token = watched
    node = cluster.status()["nodes"][0]["name"]
    with cluster.client() as client:
        futures = [client.submit(tasks.sleep_square, i, 0.05) for i in range(40)]
        assert post(f"{base}/api/nodes/workers", {"node": node, "workers": 3}, token)[1]["ok"]
        wait_for(lambda: cluster.status()["workers"] == 4, 20, 0.05, "the node grown to 3 workers")
        assert post(f"{base}/api/nodes/workers", {"node": node, "workers": 1}, token)[1]["ok"]
        wait_for(lambda: cluster.status()["workers"] == 2, 20, 0.05, "the node back to 1 worker")
        assert [f.result(60) for f in futures] == [i * i for i in range(40)]
        wait_for(lambda: len(cluster.worker_pids()) == 2, 20, 0.05, "the retired workers gone")


def test_a_drained_node_finishes_its_tasks_and_leaves(watched):
    cluster, base, token = watched
    node = cluster.status()["nodes"][0]["name"]
    with cluster.client() as client:
        futures = [client.submit(tasks.sleep_square, i, 0.05) for i in range(20)]
        assert post(f"{base}/api/nodes/drain", {"node": node}, token)[1]["ok"]
        assert [f.result(60) for f in futures] == [i * i for i in range(20)]
        wait_for(lambda: [n["name"] for n in cluster.status()["nodes"]] != [] and
                 node not in [n["name"] for n in cluster.status()["nodes"]], 30, 0.05, "the drained node gone")
        assert client.submit(tasks.square, 7).result(30) == 49  # the other node serves on
    drained = [a for a in cluster.agents if a.poll() is not None]
    assert len(drained) == 1 and drained[0].returncode == 0


def test_cancelling_a_task_from_the_dashboard_ends_its_future(watched, gate):
    cluster, base, token = watched
    with cluster.client() as client:
        blocked = client.submit(tasks.block_until, gate, 30)
        queued = [client.submit(tasks.block_until, gate, 30) for _ in range(3)]
        wait_for(lambda: cluster.status()["busy"] >= 1, 10, 0.02, "a task running")
        label = f"client-{os.getpid()}"  # what a Client calls itself (the task history shows it too)
        code, answer = post(f"{base}/api/tasks/cancel", {"producer": label, "task": blocked.task_id}, token)
        assert code == 200 and answer == {"cancelled": 1}
        with pytest.raises(cf.CancelledError):
            blocked.result(30)
        assert post(f"{base}/api/tasks/cancel", {"producer": label}, token)[1] == {"cancelled": 3}
        for fut in queued:
            with pytest.raises(cf.CancelledError):
                fut.result(30)
        assert client.submit(tasks.square, 5).result(30) == 25


def test_each_node_reports_its_load_and_its_workers(watched):
    cluster, base, token = watched

    def loaded():
        nodes = json.loads(get(f"{base}/api/status", token)[1])["nodes"]
        return nodes if all("cpu_percent" in n for n in nodes) else None

    nodes = wait_for(loaded, 20, 0.05, "a heartbeat with the nodes' load")
    pids = set(cluster.worker_pids())
    for node in nodes:
        assert 0 < node["memory_used"] < node["memory_total"] and node["cpu_percent"] >= 0
        (worker,) = node["worker_load"]
        assert worker["pid"] in pids and worker["rss"] > 1 << 20 and worker["cpu_percent"] >= 0


def test_the_grafana_dashboard_and_the_scrape_example_name_metrics_the_broker_serves(watched):
    import re

    import yaml

    _, base, token = watched
    served = set(metrics(base, token))
    root = os.path.join(os.path.dirname(__file__), os.pardir, "deploy")
    with open(os.path.join(root, "grafana", "zpar-dashboard.json")) as f:
        grafana = json.load(f)
    named = {name for panel in grafana["panels"] for target in panel["targets"]
             for name in re.findall(r"zpar_\w+", target["expr"])}
    assert named and named <= served, named - served
    with open(os.path.join(root, "prometheus", "prometheus.yml")) as f:
        scrape = yaml.safe_load(f)["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["authorization"]["type"] == "Bearer"


def test_the_embedded_cluster_serves_a_dashboard_of_its_own():
    import zpar

    with zpar.Client(workers=1) as client:
        assert client.submit(tasks.square, 6).result(30) == 36
        link = client.dashboard_link
        assert link is not None
        base, token = split_link(link)
        assert json.loads(get(f"{base}/api/status", token)[1])["workers"] == 1
        assert get(f"{base}/api/status")[0] == 401
        finished = {dict(k)["outcome"]: v for k, v in metrics(base, token)["zpar_tasks_finished_total"].items()}
        assert finished["ok"] == 1


def test_a_node_stopped_from_the_dashboard_leaves_at_once_and_its_task_runs_elsewhere(watched, gate):
    cluster, base, token = watched
    with cluster.client() as client:
        task = client.submit(tasks.block_until, gate, 30, 42)
        wait_for(lambda: cluster.status()["busy"] == 1, 10, 0.02, "the task running")
        (node,) = [n["name"] for n in cluster.status()["nodes"] if n["running"]]
        assert post(f"{base}/api/nodes/stop", {"node": node}, token)[1]["ok"]
        wait_for(lambda: node not in [n["name"] for n in cluster.status()["nodes"]], 20, 0.05, "the node gone")
        wait_for(lambda: cluster.status()["busy"] == 1, 20, 0.02, "the task running on the other node")
        open(gate, "w").close()
        assert task.result(30) == 42
