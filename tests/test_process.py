"""zpar.process.Process: multiprocessing's Process on a zpar cluster, on both topologies."""

from __future__ import annotations

import signal

import psutil
import pytest
import tasks

import zpar._default
import zpar.pprocess
from zpar import process as zprocess
from zpar.process import Process
from zpar.testing import wait_for

OWN_CLUSTER = (1, 1)  # agents, workers (conftest.own_client)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_process_runs_its_target_and_exits_with_0(client, tmp_path):
    path = tmp_path / "out"
    p = Process(target=tasks.write_text, args=(str(path), "hello"), client=client)
    assert p.exitcode is None and not p.is_alive()
    p.start()
    p.join(timeout=20)
    assert p.exitcode == 0 and not p.is_alive()
    assert path.read_text() == "hello"
    assert isinstance(p.pid, int) and p.pid == p.ident


@pytest.mark.parametrize("code,exitcode", [(3, 3), (0, 0), (None, 0), ("a message", 1)])
def test_sys_exit_in_the_target_gives_its_exit_code_and_the_worker_lives_on(client, code, exitcode):
    p = Process(target=tasks.exit_with, args=(code,), client=client)
    p.start()
    p.join(timeout=20)
    assert p.exitcode == exitcode
    assert alive(p.pid), "sys.exit ends the process's run, not its worker"


def test_a_target_that_raises_exits_with_1_and_its_exception_is_kept(client):
    p = Process(target=tasks.raise_value_error, args=("no good",), client=client)
    p.start()
    p.join(timeout=20)
    assert p.exitcode == 1
    assert isinstance(p.exception, ValueError) and "no good" in str(p.exception)


def test_join_with_a_timeout_returns_while_the_process_runs(client, gate):
    p = Process(target=tasks.block_until, args=(gate,), client=client)
    p.start()
    p.join(timeout=0.2)
    assert p.is_alive() and p.exitcode is None
    assert wait_for(lambda: p.pid, 10, what="the process started on a worker")
    open(gate, "w").close()
    p.join(timeout=20)
    assert p.exitcode == 0 and not p.is_alive()


def test_a_subclass_overriding_run_runs_on_a_worker(client, tmp_path):
    class Writer(Process):
        def __init__(self, path, **kwargs):
            super().__init__(**kwargs)
            self.path = path

        def run(self):
            with open(self.path, "w") as fh:
                fh.write(self.name)

    p = Writer(str(tmp_path / "out"), name="writer-1", client=client)
    p.start()
    p.join(timeout=20)
    assert p.exitcode == 0 and (tmp_path / "out").read_text() == "writer-1"


@pytest.mark.parametrize("stop,exitcode", [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)])
def test_terminate_and_kill_stop_a_running_process(own_client, gate, stop, exitcode):
    p = Process(target=tasks.block_until, args=(gate,), client=own_client)
    p.start()
    pid = wait_for(lambda: p.pid, 10, what="the process started on a worker")
    getattr(p, stop)()
    p.join(timeout=20)
    assert p.exitcode == exitcode and not p.is_alive()
    wait_for(lambda: not alive(pid), 10, what="its worker stopped")


@pytest.mark.parametrize("target,args,exitcode", [(tasks.os_exit, (7,), 7),
                                                  (tasks.kill_self, (signal.SIGKILL,), -signal.SIGKILL)])
def test_a_process_whose_worker_dies_gets_that_exit_code_and_is_not_run_again(own_client, target, args, exitcode):
    p = Process(target=target, args=args, client=own_client)
    p.start()
    p.join(timeout=20)
    assert p.exitcode == exitcode


def test_starting_twice_or_joining_before_start_is_an_error(client):
    p = Process(target=tasks.noop, client=client)
    with pytest.raises(AssertionError):
        p.join()
    p.start()
    with pytest.raises(AssertionError):
        p.start()
    p.join(timeout=20)
    assert p.exitcode == 0


def test_without_a_client_processes_share_a_default_embedded_cluster(tmp_path):
    try:
        first = Process(target=tasks.write_text, args=(str(tmp_path / "a"), "a"), daemon=True)
        second = Process(target=tasks.write_text, args=(str(tmp_path / "b"), "b"))
        first.start()
        second.start()
        for p in (first, second):
            p.join(timeout=30)
            assert p.exitcode == 0
        assert first._future is not None and zpar._default.shared.client is not None
        assert zprocess.active_children() == []
        # One default per program: zpar.pprocess runs on the same embedded cluster.
        assert zpar.pprocess.get_client() is zpar._default.shared.client
    finally:
        zprocess.set_default_client(None)  # closes the default client started here


def test_a_process_repr_and_name():
    p = Process(target=tasks.noop, name="worker-x")
    assert p.name == "worker-x" and "worker-x" in repr(p) and "initial" in repr(p)
    assert Process().name.startswith("Process-")
    with pytest.raises(ValueError, match="group argument must be None"):
        Process(group="g")
