"""ipc sockets zpar binds are 0600 in 0700 directories, whatever the umask: no one else can connect."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import tasks
import zmq

import zpar
from zpar import _ipc
from zpar.agent.server import AgentServer
from zpar.config import AgentConfig, BrokerConfig
from zpar.testing import wait_for

# The umasks of a shared machine's group-friendly setups, and the loosest one.
UMASKS = [0o002, 0o000]


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_private_socket(path: str | Path) -> None:
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode), f"{path} is not a socket"
    assert stat.S_IMODE(info.st_mode) == 0o600, f"{path} is {stat.S_IMODE(info.st_mode):o}, not 600"
    assert mode(os.path.dirname(path)) == 0o700, f"{os.path.dirname(path)} is not 0700"


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask-{m:03o}")
def loose_umask(request, monkeypatch, tmp_path):
    """This process (and the children it starts) run with a loose umask; temporary files go to ``tmp_path``."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the children's private directories, where we can find them
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


# ---------------------------------------------------------------------- the helper


def test_ipc_bind_makes_the_socket_file_0600_and_restores_the_umask(loose_umask, tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    path = Path(_ipc.private_dir("zpar-test-")) / "s"
    try:
        _ipc.bind(sock, f"ipc://{path}")
        assert_private_socket(path)
        assert os.umask(loose_umask) == loose_umask  # put back as it was
    finally:
        sock.close(linger=0)
        ctx.term()
        shutil.rmtree(path.parent, ignore_errors=True)


def test_ipc_bind_of_a_wildcard_endpoint_makes_its_file_0600(loose_umask):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        _ipc.bind(sock, "ipc://*")
        path = _ipc.ipc_path(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        assert path is not None and mode(path) == 0o600
    finally:
        sock.close(linger=0)
        ctx.term()


def test_ipc_bind_leaves_tcp_endpoints_alone():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        _ipc.bind(sock, "tcp://127.0.0.1:*")
        assert sock.getsockopt_string(zmq.LAST_ENDPOINT).startswith("tcp://127.0.0.1:")
    finally:
        sock.close(linger=0)
        ctx.term()


def test_private_dir_is_0700_even_under_a_strict_umask():
    previous = os.umask(0o777)
    try:
        path = _ipc.private_dir("zpar-test-")
    finally:
        os.umask(previous)
    try:
        assert mode(path) == 0o700
    finally:
        os.rmdir(path)


# ---------------------------------------------------------------------- the servers, in this process


def test_agent_worker_pipe_is_0600_in_a_0700_directory(loose_umask):
    agent = AgentServer(AgentConfig(broker="tcp://127.0.0.1:9", workers=1))  # never started: no worker, no send
    try:
        assert agent.pipe_endpoint.startswith("ipc://")
        assert_private_socket(agent.pipe_endpoint[len("ipc://"):])
    finally:
        agent.close()


def test_broker_ipc_frontend_is_0600(loose_umask, tmp_path):
    from zpar_broker.server import BrokerServer

    frontend = tmp_path / "run" / "frontend"
    frontend.parent.mkdir(mode=0o700)
    os.chmod(frontend.parent, 0o700)
    broker = BrokerServer(BrokerConfig(frontend=f"ipc://{frontend}", backend="", collector=""),
                          zmq.Context())
    try:
        assert_private_socket(frontend)
    finally:
        broker.close()
        broker.ctx.term()


# ---------------------------------------------------------------------- real processes


def _agent_pipes(root: Path) -> list[Path]:
    return sorted(root.glob("zpar-agent-*/workers"))


def test_embedded_cluster_sockets_are_0600_in_0700_directories(loose_umask, tmp_path):
    with zpar.Client(workers=1) as client:
        assert client.submit(tasks.square, 4).result(timeout=30) == 16
        cluster = client._cluster
        assert cluster is not None
        assert mode(cluster.dir) == 0o700
        assert_private_socket(cluster.frontend[len("ipc://"):])
        pipes = wait_for(lambda: _agent_pipes(tmp_path), 10, what="the embedded agent's worker pipe")
        for pipe in pipes:
            assert_private_socket(pipe)


def test_agent_daemon_worker_pipe_is_0600_in_a_0700_directory(loose_umask, tmp_path, new_cluster):
    cluster = new_cluster(agents=1, workers=1)
    with cluster.client() as client:
        assert client.submit(tasks.square, 5).result(timeout=30) == 25
    pipes = _agent_pipes(tmp_path)
    assert len(pipes) == 1
    assert_private_socket(pipes[0])


def test_a_plain_bind_under_the_loose_umask_would_let_the_group_connect(loose_umask, tmp_path):
    # Guards the tests above: without zpar's care, a socket file takes its mode from the umask.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind(f"ipc://{tmp_path}/plain")
        assert mode(tmp_path / "plain") & 0o020
    finally:
        sock.close(linger=0)
        ctx.term()


def test_sweep_removes_the_private_dirs_of_dead_processes_only(tmp_path):
    import subprocess
    import sys

    from zpar import _ipc

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"zpar-agent-{dead.pid}-abc_123", f"zpar-agent-{os.getpid()}-def456", "zpar-agent-notapid-x",
                 f"zpar-{dead.pid}-ghi789", "other-thing"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pipe").touch()
    assert _ipc.sweep("zpar-agent-", str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"zpar-agent-{os.getpid()}-def456", "zpar-agent-notapid-x", f"zpar-{dead.pid}-ghi789", "other-thing"])
    assert _ipc.sweep("zpar-", str(tmp_path)) == 1  # "zpar-agent-..." is not "zpar-<pid>-...": kept
    assert not (tmp_path / f"zpar-{dead.pid}-ghi789").exists()


def test_private_dirs_are_named_for_their_process(tmp_path, monkeypatch):
    from zpar import _ipc

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = _ipc.private_dir("zpar-test-")
    assert os.path.basename(path).startswith(f"zpar-test-{os.getpid()}-") and oct(os.stat(path).st_mode)[-3:] == "700"
    assert _ipc.sweep("zpar-test-", str(tmp_path)) == 0  # we are alive
