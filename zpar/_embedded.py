"""The embedded cluster: a private broker and one agent, in a child process.

``zpar.Client()`` with no address starts one. Its endpoints are ipc sockets
(mode 0600) in a private directory (mode 0700), whatever the umask, so
nothing listens on the network and only this user can reach them. The
children watch this process and exit when it goes, even if it is killed
without a chance to clean up.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from . import _shm
from ._ipc import private_dir, sweep
from .config import resource_amount, usable_cores

log = logging.getLogger(__name__)


def spawn_daemon(args: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m ...`` as a daemon child in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a Ctrl-C in our terminal is ours to handle, not theirs
    )


def _inherited_path_env() -> dict[str, str]:
    """Our environment, with our ``sys.path`` first, so workers import what we can.

    Functions of importable modules are pickled by reference; the workers of
    the embedded cluster should find the same modules (the script's folder
    among them), as multiprocessing's spawned children do.
    """
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    """SIGTERM each, wait up to ``timeout`` in all, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()


class EmbeddedCluster:
    """A broker and an agent with ``workers`` workers, private to this process.

    Both run in one child process and one loop (``python -m zpar_broker.embedded``):
    the same code as the daemons, one hop shorter. Only the producers'
    frontend is a socket, in a private directory.
    """

    def __init__(self, workers: int | None = None, *, max_tasks_per_worker: int = 0, heartbeat: float = 1.0,
                 log_level: str = "WARNING", resources: tuple[tuple[str, float], ...] = ()) -> None:
        # 0700 whatever the umask; the child binds the frontend in it 0600 (zpar._ipc.bind).
        self.dir = private_dir("zpar-")
        self.frontend = f"ipc://{self.dir}/frontend"
        args = ["zpar_broker.embedded", "--frontend", self.frontend, "--heartbeat", str(heartbeat),
                "--parent-pid", str(os.getpid()), "--log-level", log_level]
        # Always said: the hub starts its workers before it imports what would tell it the default.
        args += ["--workers", str(workers or usable_cores())]
        if max_tasks_per_worker:
            args += ["--max-tasks-per-worker", str(max_tasks_per_worker)]
        if resources:  # what its node offers tasks that ask for resources (zpar.config.parse_resources)
            args += ["--resources", ",".join(f"{name}={resource_amount(amount)}" for name, amount in resources)]
        self.procs: list[subprocess.Popen[bytes]] = []
        # Large buffers go through shared memory here (zpar._shm).
        self.shm_dir = _shm.make_dir()
        env = _inherited_path_env()
        if self.shm_dir:
            env[_shm.ENV] = self.shm_dir  # the hub's workers write results there
        try:
            self.procs.append(spawn_daemon(args, env=env))
        except BaseException:
            self.stop()
            raise
        # What killed clients and hubs left (SIGKILL): while the hub starts, not before.
        _shm.sweep()
        sweep("zpar-")
        sweep("zpar-agent-")

    def stop(self) -> None:
        stop_processes(self.procs)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)
        _shm.remove_dir(self.shm_dir)
