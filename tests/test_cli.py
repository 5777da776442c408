"""The console scripts, run as a user runs them: exit codes, messages, signals, leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from zpar.client import broker_status
from zpar.errors import BrokerUnavailable
from zpar.security import make_keypair_files, user_secret_path
from zpar.testing import free_port, wait_for

BIN = os.path.dirname(sys.executable)


def script(name: str) -> str:
    return os.path.join(BIN, name)


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def daemon(*args: str):
    """A daemon started as a user would; killed (with its group) if the test left it running."""
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def addresses() -> list[str]:
    return [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]


def broker_args(frontend: str, backend: str, collector: str) -> list[str]:
    return [script("zpar-broker"), "--frontend", frontend, "--backend", backend, "--collector", collector,
            "--log-level", "WARNING"]


def answering(frontend: str) -> bool:
    try:
        broker_status(frontend, 0.5)
        return True
    except BrokerUnavailable:
        return False


def test_status_json_shows_nodes_workers_and_task_counts(cluster, cluster_client):
    assert cluster_client.submit(abs, -3).result(timeout=10) == 3
    proc = run(script("zpar"), "status", "--broker", cluster.frontend, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert {"nodes", "workers", "busy", "queued", "running", "done", "failed", "counters"} <= set(info)
    assert info["workers"] == 2 and len(info["nodes"]) == 2 and info["done"] >= 1
    assert all({"name", "host", "pid", "workers", "busy", "idle"} <= set(n) for n in info["nodes"])


def test_status_table_names_every_node(cluster):
    proc = run(script("zpar"), "status", "--broker", cluster.frontend)
    assert proc.returncode == 0, proc.stderr
    for node in cluster.status()["nodes"]:
        assert node["name"] in proc.stdout
    assert "workers 2" in proc.stdout


def test_status_with_no_broker_exits_1_with_a_clear_message():
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run(script("zpar"), "status", "--broker", address, "--timeout", "1")
    assert time.monotonic() - start < 10
    assert proc.returncode == 1
    assert "no zpar broker answered" in proc.stderr and address in proc.stderr


def test_a_broker_on_every_interface_with_no_secret_uses_this_users_secret_and_refuses_status_insecure():
    port = free_port()
    _, backend, collector = addresses()
    with daemon(*broker_args(f"tcp://0.0.0.0:{port}", backend, collector)) as broker:
        frontend = f"tcp://127.0.0.1:{port}"
        wait_for(lambda: broker.poll() is not None or answering(frontend), 15, what="the broker answering")
        assert broker.poll() is None, "the broker exited"
        proc = run(script("zpar"), "status", "--broker", frontend, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["security"] == f"curve, this user's secret {user_secret_path()}"
        refused = run(script("zpar"), "status", "--broker", frontend, "--insecure", "--timeout", "5")
        assert refused.returncode == 1
        assert "requires authentication" in refused.stderr and "--insecure" in refused.stderr
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(5) == 0


def test_a_key_file_broker_without_an_allow_list_per_role_exits_2_naming_them(tmp_path):
    make_keypair_files(tmp_path, "broker")
    frontend, backend, collector = addresses()
    proc = run(*broker_args(frontend, backend, collector), "--key-file", str(tmp_path / "broker.key_secret"),
               "--allow-keys", str(tmp_path))
    assert proc.returncode == 2
    assert "allow_agent_keys" in proc.stderr and "allow_keys" in proc.stderr


def test_broker_stops_with_exit_0_on_sigterm():
    frontend, backend, collector = addresses()
    with daemon(*broker_args(frontend, backend, collector)) as broker:
        wait_for(lambda: answering(frontend), 15, what="the broker answering")
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(5) == 0


def test_a_second_broker_on_the_same_ports_exits_1_naming_the_address():
    frontend, backend, collector = addresses()
    with daemon(*broker_args(frontend, backend, collector)):
        wait_for(lambda: answering(frontend), 15, what="the first broker answering")
        second = run(*broker_args(frontend, backend, collector))
        assert second.returncode == 1
        assert frontend in second.stderr and "another broker" in second.stderr


def test_agent_stops_with_exit_0_on_sigterm_and_leaves_no_worker():
    frontend, backend, collector = addresses()
    with daemon(*broker_args(frontend, backend, collector)) as broker:
        with daemon(script("zpar-agent"), "--broker", backend, "--workers", "2", "--log-level", "WARNING") as agent:
            wait_for(lambda: answering(frontend) and broker_status(frontend)["workers"] == 2, 20,
                     what="the agent's workers registered")
            workers = psutil.Process(agent.pid).children()
            assert len(workers) == 2
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(10) == 0
            _, alive = psutil.wait_procs(workers, timeout=5)
            assert not alive, "workers outlived their agent"
            wait_for(lambda: broker_status(frontend)["workers"] == 0, 10, what="the broker forgot the agent")
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(5) == 0


def test_agent_refuses_a_negative_worker_count():
    proc = run(script("zpar-agent"), "--workers", "-1")
    assert proc.returncode == 2 and "workers" in proc.stderr


def test_python_m_zpar_broker_help_works():
    proc = run(sys.executable, "-m", "zpar_broker", "--help")
    assert proc.returncode == 0
    assert "--frontend" in proc.stdout and "--insecure" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_runs_and_reports_the_speed_up():
    proc = run(script("zpar"), "demo", "--jobs", "4", "--size", "2000", timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "speed-up" in proc.stdout and "all 4 results match" in proc.stdout


def test_status_watch_redraws_the_table_in_a_terminal_until_ctrl_c(cluster):
    import pty
    import select

    controller, terminal = pty.openpty()
    proc = subprocess.Popen([script("zpar"), "status", "--broker", cluster.frontend, "--watch", "0.2"],
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    seen = b""
    try:
        def redrawn() -> bool:  # the table, then at least one redraw of it
            nonlocal seen
            while select.select([controller], [], [], 0)[0]:
                seen += os.read(controller, 65536)
            return seen.count(b"workers 2 (busy") >= 2
        wait_for(redrawn, 20, 0.05, "zpar status --watch redrawing")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
