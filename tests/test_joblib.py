"""The joblib backend ``"zpar"`` (zpar/joblib.py), on the embedded cluster and on a broker plus agents over TCP.

Functions inside ``joblib.delayed`` travel as *arguments* of a batch, so they
are pickled by reference: on the TCP cluster, whose workers cannot import
``tasks``, these tests use builtins and the standard library; the tests that
need ``tasks`` functions run on the embedded cluster, whose workers share our
``sys.path``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

joblib = pytest.importorskip("joblib")

import tasks  # noqa: E402 - conftest puts the tests directory on sys.path; after the skip

import zpar  # noqa: E402 - after the skip
from zpar.joblib import ZparBackend  # noqa: E402 - after the skip
from zpar.testing import wait_for  # noqa: E402 - after the skip


def zpar_config(client: zpar.Client, **kwargs):
    return joblib.parallel_config(backend="zpar", client=client, **kwargs)


#: conftest.own_client: a forced cancel replaces workers, which shared clusters must not see.
OWN_CLUSTER = (2, 1)


class RecordingBackend(ZparBackend):
    """ZparBackend that remembers every batch size joblib asked it for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def compute_batch_size(self) -> int:
        size = super().compute_batch_size()
        self.sizes.append(size)
        return size


# ---------------------------------------------------------------------- results and errors


def test_results_come_back_in_input_order(client):
    with zpar_config(client, n_jobs=-1):
        out = joblib.Parallel()(joblib.delayed(math.factorial)(i % 50) for i in range(300))
    assert out == [math.factorial(i % 50) for i in range(300)]


def test_generator_output_keeps_input_order(client):
    with zpar_config(client, n_jobs=-1):
        gen = joblib.Parallel(return_as="generator")(joblib.delayed(pow)(i, 2) for i in range(100))
        assert list(gen) == [i * i for i in range(100)]


def test_task_exception_propagates_with_its_type_and_remote_traceback(client):
    with zpar_config(client, n_jobs=-1), pytest.raises(ValueError, match="invalid literal") as info:
        joblib.Parallel()(joblib.delayed(int)(s) for s in ["1", "2", "three", "4"])
    assert isinstance(info.value.__cause__, zpar.RemoteTraceback)


def test_unpicklable_argument_raises_serialization_error(client):
    with zpar_config(client, n_jobs=-1), pytest.raises(zpar.SerializationError, match="pickle"):
        joblib.Parallel()(joblib.delayed(id)(threading.Lock()) for _ in range(3))


def test_tasks_run_on_the_cluster_and_n_jobs_1_runs_here(client):
    with zpar_config(client):
        remote = joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getpid)() for _ in range(20))
        local = joblib.Parallel(n_jobs=1)(joblib.delayed(os.getpid)() for _ in range(3))
    assert os.getpid() not in remote
    assert local == [os.getpid()] * 3


def test_tasks_run_on_the_tcp_clusters_workers(cluster):
    with joblib.parallel_config(backend="zpar", address=cluster.frontend, n_jobs=-1) as config:
        pids = set(joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(40)))
        config["backend"].close()
    assert pids <= set(cluster.worker_pids())


# ---------------------------------------------------------------------- n_jobs and batching


def test_n_jobs_counts_the_clusters_workers(client):
    backend = ZparBackend(client=client)
    workers = client.status()["workers"]
    assert backend.effective_n_jobs(-1) == workers
    assert backend.effective_n_jobs(-2) == max(workers - 1, 1)
    assert backend.effective_n_jobs(1) == 1
    assert backend.effective_n_jobs(workers + 5) == workers
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)
    with zpar_config(client, n_jobs=-1):
        assert joblib.effective_n_jobs() == workers


def test_auto_batching_groups_tiny_tasks(client):
    backend = RecordingBackend(client=client)
    with joblib.parallel_config(backend=backend, n_jobs=-1):
        parallel = joblib.Parallel()
        out = parallel(joblib.delayed(abs)(-i) for i in range(3000))
    assert out == list(range(3000))
    assert max(backend.sizes) >= 8, backend.sizes
    assert parallel.n_dispatched_batches < parallel.n_dispatched_tasks / 4


# ---------------------------------------------------------------------- abort, nesting, lifetime


def test_a_failed_task_cancels_the_running_ones(own_client):
    start = time.monotonic()
    with zpar_config(own_client, n_jobs=-1), pytest.raises(ValueError, match="invalid literal for int"):
        joblib.Parallel()(joblib.delayed(f)(a) for f, a in [(int, "x"), *[(time.sleep, 30)] * 8])
    assert time.monotonic() - start < 15
    # the sleeping tasks were stopped, not left to run for 30 s
    wait_for(lambda: own_client.status()["running"] == 0, 10.0, 0.05, "no task running")


def test_parallel_inside_a_task_runs_sequentially_in_its_worker(embedded_client):
    with zpar_config(embedded_client, n_jobs=-1):
        runs = joblib.Parallel()(joblib.delayed(tasks.nested_joblib)(5, backend) for backend in [None, "zpar"])
    for outer, inner in runs:
        assert outer[0] != os.getpid()
        assert inner == [outer] * 5  # the worker's own process and thread


def test_backend_started_cluster_stops_when_the_backend_is_closed():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with joblib.parallel_config(backend="zpar", workers=2, n_jobs=-1) as config:
        assert joblib.Parallel()(joblib.delayed(pow)(i, 3) for i in range(10)) == [i**3 for i in range(10)]
        backend = config["backend"]
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert started
        backend.close()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive


def test_client_with_address_is_a_config_error(embedded_client):
    with pytest.raises(zpar.ConfigError, match="client="):
        ZparBackend("tcp://127.0.0.1:5555", client=embedded_client)


# ---------------------------------------------------------------------- scikit-learn


LOKY_GRID_SEARCH = """
import json
import joblib
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

X, y = load_digits(return_X_y=True)
with joblib.parallel_config(backend="loky"):
    search = GridSearchCV(SVC(), {grid!r}, cv=3, n_jobs=2).fit(X[:{n}], y[:{n}])
print(json.dumps([search.best_params_, list(search.cv_results_["mean_test_score"])]))
"""
GRID = {"C": [0.1, 1, 10], "gamma": [1e-4, 1e-3, 1e-2]}
SAMPLES = 400


@pytest.fixture(scope="module")
def loky_grid_search():
    """The best parameters and mean scores loky finds, from a process of its own.

    loky keeps its workers and resource trackers after a call; in a child
    process that has exited, none of them is ours.
    """
    pytest.importorskip("sklearn")
    script = LOKY_GRID_SEARCH.format(grid=GRID, n=SAMPLES)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=45, check=True)
    best, scores = json.loads(done.stdout.strip().splitlines()[-1])
    return best, scores


def test_grid_search_finds_the_same_parameters_as_with_loky(client, loky_grid_search):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_digits(return_X_y=True)
    with zpar_config(client):
        ours = GridSearchCV(SVC(), GRID, cv=3, n_jobs=-1).fit(X[:SAMPLES], y[:SAMPLES])

    best, scores = loky_grid_search
    assert ours.best_params_ == best
    assert list(ours.cv_results_["mean_test_score"]) == pytest.approx(scores, abs=1e-12)
