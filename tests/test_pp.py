"""zpar.pp, Parallel Python's API on zpar: pp's behaviours, on the embedded cluster and on brokers over TCP."""

from __future__ import annotations

import colorsys
import os
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest
import tasks

import zpar
from zpar import pp
from zpar.testing import free_port, wait_for

TOPOLOGIES = ["embedded", "tcp"]


@pytest.fixture(scope="module", params=TOPOLOGIES)
def server(request):
    """A shared Server of each topology: 2 local workers, or none and the TCP cluster's broker."""
    if request.param == "embedded":
        s = pp.Server(2)
    else:
        s = pp.Server(0, ppservers=(request.getfixturevalue("cluster").frontend,))
    yield s
    s.destroy()


@pytest.fixture(params=TOPOLOGIES)
def strict_server(request):
    if request.param == "embedded":
        s = pp.Server(1, strict=True)
    else:
        s = pp.Server(0, ppservers=(request.getfixturevalue("cluster").frontend,), strict=True)
    yield s
    s.destroy()


def embedded_clusters() -> set[int]:
    """Pids of this process's embedded clusters (one broker-and-agent process each)."""
    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            # The hub's workers are forked from it (same command line): they are named zpar-worker-wN.
            if ("zpar_broker.embedded" in " ".join(proc.cmdline()) and not proc.name().startswith("zpar-worker")
                    and proc.status() != psutil.STATUS_ZOMBIE):
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return pids


def release(gate: str) -> None:
    open(gate, "w").close()


# ---------------------------------------------------------------------- jobs


def test_job_call_returns_the_result_and_the_job_reports_finished(server):
    job = server.submit(tasks.add, (2, 3))
    assert job.wait(30)
    assert job.finished
    assert job() == 5
    assert job() == 5  # again: the same result


def test_jobs_run_in_worker_processes(server):
    pids = {job() for job in [server.submit(tasks.worker_pid) for _ in range(4)]}
    assert os.getpid() not in pids and None not in pids


def test_modules_are_bound_as_globals_of_the_function_in_the_worker(server):
    # tasks.py never imports colorsys: only pp's `modules` can make the name exist remotely.
    assert server.submit(tasks.pp_uses_colorsys, (1.0, 0.0, 0.0), modules=("colorsys",))() == (0.0, 1.0, 1.0)
    assert server.submit(tasks.pp_uses_osp, ("/a/b.txt",), modules=("import os.path as osp",))() == "b.txt"


def test_without_its_module_the_function_meets_a_name_error(server, capsys):
    assert server.submit(tasks.pp_uses_colorsys, (1.0, 0.0, 0.0))() is None
    assert "NameError: name 'colorsys' is not defined" in capsys.readouterr().out


def test_depfuncs_are_bound_by_name(server):
    helper = tasks.pp_make_helper()
    assert server.submit(tasks.pp_calls_undefined_helper, (4,), depfuncs=(helper,))() == 41


def test_globals_gives_its_modules_and_functions(server):
    namespace = {"__name__": "somewhere", "colorsys": colorsys}
    assert server.submit(tasks.pp_uses_colorsys, (0.0, 0.0, 1.0), globals=namespace)() == (2 / 3, 1.0, 1.0)


def test_closures_and_lambdas_run_unlike_in_pp(server):
    k = 7
    assert server.submit(lambda x: x * k, (6,))() == 42


def test_a_bound_method_runs_with_the_instance_as_it_was_at_each_submit(server):
    acc = tasks.pp_make_accumulator(10)
    first = server.submit(acc.add, (5,))
    acc.total = 100
    second = server.submit(acc.add, (5,))
    assert (first(), second()) == (15, 105)


def test_what_a_job_prints_is_printed_here_when_its_result_is_taken(server, capsys):
    job = server.submit(tasks.pp_prints, ("hi",))
    assert job.wait(30)
    assert "job says" not in capsys.readouterr().out  # pp prints it with the result, not before
    assert job() == "hi"
    assert job() == "hi"
    assert capsys.readouterr().out == "job says hi\n"  # once


def test_a_job_that_raised_returns_none_and_prints_the_remote_traceback(server, capsys):
    assert server.submit(tasks.raise_value_error, ("boom",))() is None
    out = capsys.readouterr().out
    assert out.startswith("An error has occurred during the function execution\nTraceback (most recent call last):")
    assert "in raise_value_error" in out and out.endswith("ValueError: boom\n")


def test_strict_mode_raises_the_job_exception_with_its_remote_traceback(strict_server, capsys, caplog):
    called = []
    job = strict_server.submit(tasks.raise_value_error, ("boom",), callback=called.append)
    with pytest.raises(ValueError, match="boom") as info:
        job()
    assert isinstance(info.value.__cause__, zpar.RemoteTraceback)
    assert called == [] and capsys.readouterr().out == ""
    assert any("its callback is not called" in r.getMessage() for r in caplog.records)
    assert strict_server.submit(tasks.add, (1, 2))() == 3


def test_arguments_that_cannot_be_pickled_fail_at_submit(server):
    with pytest.raises(zpar.SerializationError):
        server.submit(tasks.identity, (threading.Lock(),))


def test_pp_argument_mistakes_raise_type_error(server):
    with pytest.raises(TypeError, match="args argument must be a tuple"):
        server.submit(tasks.square, [3])
    with pytest.raises(TypeError, match="modules"):
        server.submit(tasks.square, (3,), modules=(colorsys,))


def test_template_submits_its_function_with_new_arguments(server):
    template = pp.Template(server, tasks.pp_uses_colorsys, modules=("colorsys",))
    jobs = [template.submit(0.0, 1.0, 0.0), template.submit(0.0, 0.0, 1.0)]
    assert [job() for job in jobs] == [(1 / 3, 1.0, 1.0), (2 / 3, 1.0, 1.0)]


# ---------------------------------------------------------------------- callbacks and wait


def test_callback_gets_its_arguments_then_the_result_in_a_thread_of_its_own(server):
    seen = []
    lock = threading.Lock()

    def callback(label, result):
        with lock:
            seen.append((label, result, threading.current_thread() is threading.main_thread()))

    for i in range(6):
        server.submit(tasks.square, (i,), callback=callback, callbackargs=("sq",), group="callbacks")
    assert server.wait("callbacks", timeout=30)  # returns once the callbacks have run, too
    assert sorted(seen) == [("sq", i * i, False) for i in range(6)]


def test_a_callback_that_raises_does_not_lose_the_result(server):
    def callback(result):
        raise RuntimeError("callback trouble")

    job = server.submit(tasks.add, (1, 1), callback=callback)
    assert job.wait(30) and job() == 2


def test_wait_for_a_group_does_not_wait_for_the_others(server, gate):
    # The fast jobs go first: a job may queue behind a blocked one at an agent that prefetched it.
    fast = [server.submit(tasks.square, (i,), group="fast") for i in range(3)]
    slow = [server.submit(tasks.block_until, (gate, 30, "slow"), group="slow")]
    assert server.wait("fast", timeout=30)
    assert all(job.finished for job in fast)
    assert not server.wait("slow", timeout=0.05)
    release(gate)
    assert server.wait(timeout=30)  # every group
    assert slow[0]() == "slow"


# ---------------------------------------------------------------------- nodes, sizes and statistics


def test_set_ncpus_starts_a_new_pool_and_the_old_one_finishes_its_jobs(gate):
    before = embedded_clusters()
    server = pp.Server(1)
    try:
        (old,) = embedded_clusters() - before
        held = [server.submit(tasks.block_until, (gate, 30, i)) for i in range(4)]  # 2 handed out, 2 queued
        server.set_ncpus(2)
        assert server.get_ncpus() == 2 and server.get_active_nodes() == {"local": 2}
        release(gate)
        assert [job() for job in held] == [0, 1, 2, 3]
        assert server.submit(tasks.add, (1, 2))() == 3
        wait_for(lambda: old not in embedded_clusters(), 15, what="the replaced pool stops once empty")
        assert len(embedded_clusters() - before) == 1
        assert server.get_stats()["local"].njobs == 5
    finally:
        server.destroy()


def test_restart_runs_every_job_in_a_fresh_worker():
    server = pp.Server(1, restart=True)
    try:
        pids = [server.submit(tasks.worker_pid)() for _ in range(3)]
        assert len(set(pids)) == 3
    finally:
        server.destroy()


def test_set_ncpus_zero_leaves_the_jobs_to_the_remote_brokers(cluster):
    server = pp.Server(1, ppservers=(cluster.frontend,))
    try:
        server.set_ncpus(0)
        assert server.get_ncpus() == 0
        remote = set(cluster.worker_pids())
        assert {job() for job in [server.submit(tasks.worker_pid) for _ in range(6)]} <= remote
        server.set_ncpus(1)
        assert server.submit(tasks.worker_pid)() not in remote
    finally:
        server.destroy()


def test_nodes_share_the_jobs_by_their_workers_twice_over(cluster, gate):
    name = cluster.frontend.removeprefix("tcp://")
    server = pp.Server(1, ppservers=(cluster.frontend,))
    try:
        assert server.get_active_nodes() == {"local": 1, name: 2}
        jobs = [server.submit(tasks.block_until, (gate, 30, i)) for i in range(7)]
        # local: 1 worker, 2 jobs; the broker: 2 workers, 4 jobs; the 7th waits in the Server.
        wait_for(lambda: {k: s.njobs for k, s in server.get_stats().items()} == {"local": 2, name: 4}, 10,
                 what="2 jobs handed to the local pool and 4 to the broker")
        release(gate)
        assert [job() for job in jobs] == list(range(7))
        stats = server.get_stats()
        assert sum(s.njobs for s in stats.values()) == 7
        assert stats[name].ncpus == 2 and stats[name].rtime > 0
    finally:
        server.destroy()


def test_jobs_held_by_a_broker_that_went_away_run_elsewhere(new_cluster, gate, caplog):
    remote = new_cluster(agents=1, workers=2)
    server = pp.Server(0, ppservers=(remote.frontend,), broker_timeout=0.5)
    try:
        jobs = [server.submit(tasks.block_until, (gate, 30, i)) for i in range(2)]
        wait_for(lambda: remote.status()["running"] == 2, 10, what="both jobs running on the broker's agent")
        remote.broker.kill()
        server.set_ncpus(1)
        release(gate)
        assert [job() for job in jobs] == [0, 1]
        stats = server.get_stats()
        assert stats["local"].njobs == 2 and stats[remote.frontend.removeprefix("tcp://")].njobs == 0
        assert sum("requeued" in r.getMessage() for r in caplog.records) == 2
    finally:
        server.destroy()


def test_ppservers_take_host_port_or_tcp_addresses(cluster):
    host_port = cluster.frontend.removeprefix("tcp://")
    server = pp.Server(0, ppservers=(host_port,))
    try:
        assert server.get_active_nodes() == {"local": 0, host_port: 2}
        assert server.submit(tasks.square, (9,))() == 81
    finally:
        server.destroy()


def test_ppservers_reject_autodiscovery_with_a_port_and_non_tuples():
    # ("*",) finds the broker on the LAN: tests/test_discovery.py
    with pytest.raises(zpar.ConfigError, match="autodiscovery"):
        pp.Server(0, ppservers=("192.168.1.*:60000",))
    with pytest.raises(TypeError, match="tuple"):
        pp.Server(0, ppservers=["localhost"])


def test_a_secret_zpar_refuses_fails_at_server_creation(cluster):
    with pytest.raises(zpar.ConfigError, match="secret"):
        pp.Server(0, ppservers=(cluster.frontend,), secret="short")


def test_with_no_workers_at_all_jobs_wait_for_set_ncpus(caplog):
    server = pp.Server(0)
    try:
        job = server.submit(tasks.add, (1, 1))
        assert not job.wait(0.05)
        assert any("no local workers" in r.getMessage() for r in caplog.records)
        server.set_ncpus(1)
        assert job() == 2
    finally:
        server.destroy()


def test_a_broker_that_does_not_answer_is_skipped_and_the_jobs_run_locally(caplog):
    address = f"127.0.0.1:{free_port()}"
    server = pp.Server(1, ppservers=(address,), connect_timeout=0.2)
    try:
        assert server.get_active_nodes() == {"local": 1}
        assert server.submit(tasks.add, (2, 2))() == 4
        assert any("no zpar broker answered" in r.getMessage() for r in caplog.records)
    finally:
        server.destroy()


def test_statistics_count_jobs_and_time_per_node(server, capsys):
    before = server.get_stats()
    node = next(iter(before)) if server.get_ncpus() else next(k for k in before if k != "local")
    for job in [server.submit(tasks.sleep_square, (i, 0.01)) for i in range(4)]:
        job()
    stats = server.get_stats()[node]
    assert stats.njobs == before[node].njobs + 4
    assert stats.time - before[node].time >= 0.04 and stats.rtime - before[node].rtime >= 0.04
    assert stats.ncpus == 2
    server.print_stats()
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["Job execution statistics:",
                       " job count | % of all jobs | job time sum | time per job | job server"]
    assert any(line.endswith(f"| {node}") for line in out)
    assert out[-2] == f"0 active tasks, {server.get_ncpus()} cores" and out[-1] == ""


# ---------------------------------------------------------------------- lifetime


def test_destroy_ends_unfinished_jobs_and_refuses_new_ones(gate):
    server = pp.Server(1)
    held = [server.submit(tasks.block_until, (gate, 30, i)) for i in range(3)]
    server.destroy()
    for job in held:
        assert job.wait(10)
        with pytest.raises(pp.DestroyedServerError):
            job()
    with pytest.raises(pp.DestroyedServerError):
        server.submit(tasks.square, (2,))
    assert server.wait(timeout=1)
    server.destroy()  # again: nothing happens
    # the autouse leak check verifies that the embedded cluster is gone


EXIT_PROBE = textwrap.dedent("""
    import atexit, json, psutil

    def report():  # registered first, so it runs after zpar.pp's own exit handler
        children = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        print(json.dumps({"destroyed": "destroyed" in repr(server), "children": len(children)}))

    atexit.register(report)
    import zpar.pp as pp

    server = pp.Server(1)
    assert server.submit(pow, (2, 5))() == 32
    server.submit(pow, (3, 2))
""")


def test_a_server_not_destroyed_is_destroyed_at_exit():
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '{"destroyed": true, "children": 0}'


IMPORT_PROBE = textwrap.dedent("""
    import json, sys, threading
    sys.addaudithook(lambda event, args: event in ("subprocess.Popen", "socket.bind", "socket.connect",
                                                  "_thread.start_new_thread") and print(event, file=sys.stderr))
    import zpar.pp
    print(json.dumps({"threads": threading.active_count()}))
""")


def test_importing_zpar_pp_starts_nothing():
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.strip() == '{"threads": 1}'
