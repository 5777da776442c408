"""The ledger and checker (zpar.testing.ledger): hand-made ledgers first, then one fault-free cluster run."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import pytest

import zpar
from zpar.testing.ledger import Ledger, check, execution, log_execution, read_executions

# ---------------------------------------------------------------------- the producer side


def test_an_empty_ledger_passes():
    report = check(Ledger(), {})
    assert report.ok
    assert (report.submitted, report.completed, report.lost, report.dup_delivered, report.wrong,
            report.stragglers) == (0, 0, 0, 0, 0, 0)
    assert report.failed == {} and report.executions == {}


def test_each_kind_of_problem_is_counted_once():
    ledger = Ledger()
    for i in range(7):
        ledger.submitted(i)
    ledger.delivered(0, 0)                          # right
    ledger.delivered(1, 999)                        # wrong value
    ledger.delivered(2, error=zpar.WorkerLost("SIGKILL"))
    ledger.delivered(3, error="TaskTimeout")
    ledger.delivered(3, error="TaskTimeout")        # delivered twice
    # 4: nothing delivered: lost
    ledger.delivered(5, 25)                         # no expected value for it: wrong
    ledger.delivered(6, 36)
    ledger.delivered(6, 36)                         # right, but twice
    report = check(ledger, {i: i * i for i in range(5)} | {6: 36})
    assert report.submitted == 7
    assert report.completed == 4                    # 0, 1, 5, 6 (a result, right or not)
    assert report.failed == {"WorkerLost": 1, "TaskTimeout": 1}
    assert (report.lost, report.dup_delivered, report.wrong, report.stragglers) == (1, 2, 2, 0)
    assert report.examples == {"lost": [4], "dup_delivered": [3, 6], "wrong": [1, 5]}
    assert not report.ok
    assert "lost 1" in report.summary()


def test_a_later_outcome_does_not_hide_a_wrong_first_one():
    ledger = Ledger()
    ledger.submitted("a")
    ledger.delivered("a", "bad")
    ledger.delivered("a", "good")
    report = check(ledger, {"a": "good"})
    assert (report.completed, report.wrong, report.dup_delivered) == (1, 1, 1)


def test_an_id_submitted_twice_is_a_harness_bug():
    ledger = Ledger()
    ledger.submitted(1)
    with pytest.raises(ValueError, match="already submitted"):
        ledger.submitted(1)


def test_tracked_futures_record_results_errors_cancels_and_stragglers():
    ledger = Ledger()
    futures = [ledger.track(i, concurrent.futures.Future()) for i in range(5)]
    futures[0].set_result("zero")
    futures[1].set_exception(zpar.TaskTimeout("too slow"))
    futures[2].cancel()
    futures[3].set_result("three")
    # futures[4] never completes
    assert ledger.counts() == (5, 4)
    assert ledger.seal() == [4]
    futures[4].set_result("four")                   # after the deadline: late, still lost
    report = check(ledger, {0: "zero", 3: "three", 4: "four"})
    assert report.completed == 2
    assert report.failed == {"TaskTimeout": 1, "CancelledError": 1}
    assert (report.lost, report.stragglers, report.late, report.wrong) == (1, 1, 1, 0)
    assert report.examples["stragglers"] == [4] and report.examples["lost"] == [4]


def test_check_seals_the_ledger():
    ledger = Ledger()
    fut = ledger.track("x", concurrent.futures.Future())
    assert check(ledger, {"x": 1}).stragglers == 1
    fut.set_result(1)
    report = check(ledger, {"x": 1})
    assert (report.stragglers, report.lost, report.late) == (1, 1, 1)


def test_outcomes_are_timestamped_in_order():
    ledger = Ledger()
    for i in range(3):
        ledger.submitted(i)
        ledger.delivered(i, i)
    _, outcomes = ledger.snapshot()
    times = [outcomes[i][0].at for i in range(3)]
    assert times == sorted(times)


# ---------------------------------------------------------------------- the execution log


def test_execution_logs_start_and_end_even_when_the_task_raises(tmp_path):
    with execution(tmp_path, 7, attempt=1):
        pass
    with pytest.raises(KeyError), execution(tmp_path, 8):
        raise KeyError("in the task")
    runs, bad = read_executions(tmp_path)
    assert bad == 0 and sorted(runs) == [7, 8]
    (run,) = runs[7]
    assert (run.task_id, run.attempt, run.pid) == (7, 1, os.getpid())
    assert run.end is not None and run.end >= run.start
    assert runs[8][0].end is not None
    assert len(list(tmp_path.iterdir())) == 1       # one file per process


def test_histogram_interrupted_unknown_and_bad_lines(tmp_path):
    ledger = Ledger()
    for i in range(4):
        ledger.submitted(i)
        ledger.delivered(i, i)
    log_execution(tmp_path, 0, start=1.0, end=2.0)
    log_execution(tmp_path, 1, start=1.0, end=2.0)
    log_execution(tmp_path, 1, start=3.0, end=None)  # a second run, killed mid-way
    log_execution(tmp_path, 2, start=1.0, end=None)  # started, never finished, then ran again
    log_execution(tmp_path, 2, start=5.0, end=6.0)
    log_execution(tmp_path, 2, start=7.0, end=8.0)
    log_execution(tmp_path, "stray", start=1.0, end=2.0)  # never submitted
    # 3 never ran at all
    with open(tmp_path / "exec-host-1.jsonl", "a") as fh:
        fh.write('{"id": 9, "pid": \n')               # a torn line
    report = check(ledger, {i: i for i in range(4)}, tmp_path)
    assert report.executions == {0: 1, 1: 1, 2: 1, 3: 1}
    assert (report.interrupted, report.unknown_executions, report.bad_lines) == (2, 1, 1)
    assert report.examples == {"executed_again": [1, 2]}
    assert report.ok                                # the checker's bars are about delivery


def test_worker_processes_append_concurrently_to_their_own_files(tmp_path):
    """Several processes (as workers of several nodes would), each logging many runs at once."""
    script = textwrap.dedent("""
        import os, sys
        from zpar.testing.ledger import execution
        base, exec_dir = int(sys.argv[1]), sys.argv[2]
        for i in range(base, base + 200):
            with execution(exec_dir, i):
                pass
        with execution(exec_dir, base):           # one id twice
            pass
        with execution(exec_dir, -base - 1):      # killed mid-task: no end line
            os._exit(0)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k * 1000), str(tmp_path)]) for k in range(4)]
    for p in procs:
        assert p.wait(timeout=30) == 0
    runs, bad = read_executions(tmp_path)
    assert bad == 0
    assert len(list(tmp_path.glob("exec-*.jsonl"))) == 4
    assert sum(len(r) for r in runs.values()) == 4 * 202
    assert {len(runs[k * 1000]) for k in range(4)} == {2}
    assert all(runs[-k * 1000 - 1][0].end is None for k in range(4))
    pids = {r.pid for rs in runs.values() for r in rs}
    assert pids == {p.pid for p in procs}
    for path in tmp_path.iterdir():                 # whole lines only
        for line in path.read_text().splitlines():
            json.loads(line)


# ---------------------------------------------------------------------- a real cluster


@pytest.mark.timeout(120)
def test_fault_free_run_on_a_cluster_delivers_each_task_once_and_runs_it_once(new_cluster, tmp_path):
    cluster = new_cluster(agents=2, workers=1)
    exec_dir = str(tmp_path)

    def logged_square(i):  # a closure, so it travels by value
        with execution(exec_dir, i):
            return i * i

    n = 500
    ledger = Ledger()
    with cluster.client() as client:
        futures = [ledger.track(i, client.submit(logged_square, i)) for i in range(n)]
        _, not_done = concurrent.futures.wait(futures, timeout=60)
        report = check(ledger, {i: i * i for i in range(n)}, exec_dir)
        workers = set(cluster.worker_pids())
    assert not not_done, report.summary()
    assert report.ok, report.summary()
    assert (report.submitted, report.completed, report.failed) == (n, n, {})
    assert (report.lost, report.dup_delivered, report.wrong, report.stragglers) == (0, 0, 0, 0)
    assert report.executions == {1: n}, report.summary()
    assert (report.interrupted, report.unknown_executions, report.bad_lines, report.late) == (0, 0, 0, 0)
    runs, _ = read_executions(exec_dir)
    assert {r.pid for rs in runs.values() for r in rs} <= workers  # logged by the cluster's workers
