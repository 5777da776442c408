"""Shared fixtures: clusters, clients, a gate for blocking tasks, and the leak check.

Task functions live in ``tests/tasks.py``. pytest imports test modules with
``--import-mode=importlib`` and workers run elsewhere, so neither can import
``tasks`` by name: we put this directory on ``sys.path`` for the test modules
and register the module with cloudpickle so its functions travel by value.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time

import cloudpickle
import psutil
import pytest
from hypothesis import HealthCheck, settings

import zpar
from zpar.testing import LocalCluster

sys.path.insert(0, os.path.dirname(__file__))
import tasks

# This user's own secret (zpar._secrets.user_secret) is made on first use: the suite's goes into a
# directory of its own, never into the home of whoever runs it.
_CONFIG_HOME = tempfile.mkdtemp(prefix="zpar-tests-config-")
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME
atexit.register(shutil.rmtree, _CONFIG_HOME, ignore_errors=True)

cloudpickle.register_pickle_by_value(tasks)

# Brokers the tests start on 0.0.0.0 would announce themselves on this host's LAN (mDNS): only the discovery
# tests, in network namespaces of their own, ask for it.
os.environ["ZPAR_ANNOUNCE"] = "off"

settings.register_profile("zpar", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("zpar")

#: How long a process may take to go after the test that started it ended.
LEAK_GRACE = 10.0


# ---------------------------------------------------------------------- leaks


def _key(proc: psutil.Process) -> tuple[int, float] | None:
    """A process's identity that survives pid reuse; None if it is gone or a zombie.

    Its start in clock ticks since boot (/proc/PID/stat), not psutil's ``create_time()``: that adds the
    boot time, which moves when the clock is stepped (seen in this VM), and a shared cluster started
    before the step then looked like a new process, was killed as a leak, and failed the tests after it.
    """
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        with open(f"/proc/{proc.pid}/stat", "rb") as stat:
            return proc.pid, float(stat.read().rsplit(b")", 1)[1].split()[19])  # field 22: starttime
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # no /proc: psutil's figure
        return proc.pid, proc.create_time()


def live_descendants() -> dict[tuple[int, float], psutil.Process]:
    """Every live (non-zombie) process below this one."""
    out = {}
    for proc in psutil.Process().children(recursive=True):
        key = _key(proc)
        if key is not None:
            out[key] = proc
    return out


def _describe(procs) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"pid {proc.pid}: (gone)")
    return "\n".join(lines)


def assert_gone(before: dict, grace: float = LEAK_GRACE, what: str = "the test") -> None:
    """Wait up to ``grace`` for every descendant not in ``before`` to exit; kill and fail otherwise."""
    deadline = time.monotonic() + grace
    while True:
        extra = [p for k, p in live_descendants().items() if k not in before]
        if not extra or time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # polling with a deadline, not a blind wait
    if extra:
        listing = _describe(extra)
        for proc in extra:
            try:
                proc.kill()
            except psutil.Error:
                pass
        pytest.fail(f"{len(extra)} process(es) outlived {what} by {grace:g} s:\n{listing}")


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """No child process started during a test may outlive it.

    Session and module fixtures (shared clusters) are set up before this one,
    so their processes are part of the baseline.
    """
    before = live_descendants()
    yield
    assert_gone(before)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes_at_exit():
    yield
    assert_gone({}, what="the session")


# ---------------------------------------------------------------------- clusters


def stop_cleanly(cluster: LocalCluster) -> None:
    procs = cluster.processes()
    killed = cluster.stop()
    assert not killed, f"had to SIGKILL after the stop timeout:\n{_describe(killed)}"
    _, alive = psutil.wait_procs(procs, timeout=LEAK_GRACE)
    assert not alive, f"cluster processes left after stop:\n{_describe(alive)}"


def settled(cluster: LocalCluster) -> LocalCluster:
    """Wait until every agent of the cluster has registered all its workers."""
    cluster.wait_for_workers(cluster.workers * len(cluster.agents))
    return cluster


@pytest.fixture(scope="session")
def cluster():
    """A broker and 2 agents x 1 worker on TCP loopback, shared by tests that do not break it."""
    c = LocalCluster(agents=2, workers=1)
    yield settled(c)
    stop_cleanly(c)


@pytest.fixture(scope="session")
def cluster_client(cluster):
    with cluster.client() as client:
        yield client


@pytest.fixture(scope="session")
def embedded_client():
    """``zpar.Client()``: a private cluster on ipc, one worker per core."""
    with zpar.Client() as client:
        yield client


#: The two topologies every behaviour suite runs on.
TOPOLOGIES = ["embedded", "tcp"]


@pytest.fixture(scope="session", params=TOPOLOGIES)
def client(request):
    """A shared client of each topology (``embedded_client``, ``cluster_client``).

    Tests must leave its cluster as they found it. The session clusters start
    here, before the leak check takes its baseline.
    """
    return request.getfixturevalue("embedded_client" if request.param == "embedded" else "cluster_client")


@pytest.fixture(scope="module", params=TOPOLOGIES)
def address(request):
    """None: each Executor starts its own embedded cluster; else the session cluster's frontend."""
    return None if request.param == "embedded" else request.getfixturevalue("cluster").frontend


@pytest.fixture(scope="module")
def executor(address):
    """One Executor per topology and module, for the tests that do not shut it down."""
    ex = zpar.Executor(2, address)
    yield ex
    ex.shutdown(cancel_futures=True)


@pytest.fixture
def pprocess_default():
    """zpar.pprocess tests start and end with the module's default layer, and nothing it started running."""
    from zpar import pprocess

    pprocess.use()
    yield
    pprocess.use()
    pprocess.shutdown()


@pytest.fixture(params=TOPOLOGIES)
def own_client(request):
    """A client of a cluster of this test's own, for tests that stop workers (their replacements are new
    processes). Its size: the test module's ``OWN_CLUSTER = (agents, workers)``, (1, 2) if it has none;
    embedded, agents x workers workers."""
    agents, workers = getattr(request.module, "OWN_CLUSTER", (1, 2))
    if request.param == "embedded":
        made = zpar.Client(workers=agents * workers)
    else:
        made = request.getfixturevalue("new_cluster")(agents=agents, workers=workers).client()
    with made:
        yield made


@pytest.fixture
def new_cluster():
    """A factory for clusters a test may break; each is stopped, and checked, at teardown."""
    made: list[LocalCluster] = []

    def make(settle: bool = True, **kwargs) -> LocalCluster:
        c = LocalCluster(**kwargs)
        made.append(c)
        return settled(c) if settle else c

    yield make
    for c in made:
        stop_cleanly(c)


@pytest.fixture
def gate(tmp_path):
    """A path for ``tasks.block_until``; opened at teardown so no blocked task outlives the test."""
    path = str(tmp_path / "gate")
    yield path
    open(path, "w").close()
