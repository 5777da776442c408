"""A real cluster for tests: a broker and agents as processes on TCP loopback.

Our own tests use it and so can users' tests::

    from zpar.testing import LocalCluster

    def test_my_pipeline():
        with LocalCluster(agents=2, workers=1) as cluster, cluster.client() as client:
            assert client.submit(my_task, 3).result(timeout=10) == 9

Every daemon runs in its own process group, with fast heartbeats so that
failure detection takes a fraction of a second; ``stop()`` kills what is left
and can tell whether anything outlived it.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, Self, TypeVar

import psutil

from .. import security
from .._embedded import spawn_daemon, stop_processes
from ..client import Client, broker_status
from ..errors import BrokerUnavailable

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> T:
    """Poll ``condition`` until it returns something true; its value, or TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not true within {timeout} s: {what or condition}")
        time.sleep(interval)


class LocalCluster:
    """``agents`` agents of ``workers`` workers each, behind one broker, all on loopback TCP."""

    def __init__(self, agents: int = 2, workers: int = 1, *, heartbeat: float = 0.1, liveness: int = 3,
                 log_level: str = "WARNING", ready_timeout: float = 20.0, agent_args: Sequence[str] = (),
                 broker_args: Sequence[str] = (), secret: str | None = None, insecure: bool = False) -> None:
        self.heartbeat, self.liveness, self.log_level = heartbeat, liveness, log_level
        # Every socket speaks CurveZMQ: with ``secret`` (given to the daemons by environment, not argv), or
        # else with this user's own secret; ``insecure`` runs everything without authentication.
        self.secret, self.insecure = secret, insecure
        self._env = {**os.environ, "ZPAR_SECRET": secret} if secret else None
        self._creds = security.client_credentials("producer", secret=secret, insecure=insecure)
        insecurity = ["--insecure"] if insecure else []
        self.agent_args = [*insecurity, *agent_args]  # extra zpar-agent flags, e.g. ["--max-tasks-per-worker", "5"]
        # Its dashboard on a free port (not the default 8790, which a user's own broker may be serving).
        dashboard = [] if any(a.startswith("--dashboard") for a in broker_args) else ["--dashboard", "127.0.0.1:0"]
        # Extra zpar-broker flags, e.g. ["--max-queued-tasks", "5"].
        self.broker_args = [*insecurity, *dashboard, *broker_args]
        self.workers = workers
        self.broker: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        self._clients: list[Client] = []
        try:
            self._start_broker_on_free_ports(ready_timeout)
            for _ in range(agents):
                self.add_agent(wait=False)
            self.wait_for_workers(agents * workers, ready_timeout)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ processes

    def _start_broker_on_free_ports(self, timeout: float, attempts: int = 5) -> None:
        """Start the broker on ports that were free a moment ago; others if one was taken meanwhile.

        ``free_port`` cannot reserve a port: another process (any client's
        ephemeral port) may take it before the broker binds, and the broker
        then exits. Try fresh ports a few times before giving up.
        """
        for _ in range(attempts):
            self.ports = [free_port() for _ in range(3)]
            self.frontend, self.backend, self.collector = (f"tcp://127.0.0.1:{p}" for p in self.ports)
            broker = self.start_broker()
            wait_for(functools.partial(self._up_or_gone, broker), timeout, 0.02, "the broker listening")
            if broker.poll() is None:
                return
        raise OSError(f"the broker could not bind free ports in {attempts} attempts")

    def _up_or_gone(self, broker: subprocess.Popen[bytes]) -> bool:
        if broker.poll() is not None:
            return True
        try:
            broker_status(self.frontend, 0.5, self._creds, insecure=self.insecure)
        except BrokerUnavailable:
            return False
        return True

    def start_broker(self) -> subprocess.Popen[bytes]:
        self.broker = spawn_daemon(["zpar_broker", "--frontend", self.frontend, "--backend", self.backend,
                                    "--collector", self.collector, "--heartbeat", str(self.heartbeat),
                                    "--liveness", str(self.liveness), "--log-level", self.log_level,
                                    *self.broker_args],
                                   env=self._env)
        return self.broker

    def add_agent(self, workers: int | None = None, *, wait: bool = True, name: str | None = None,
                  host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
        """Start another agent; ``host`` is where it looks for the broker (a proxy's address, say)."""
        n = workers or self.workers
        backend = f"tcp://{host}:{self.ports[1]}"
        args = ["zpar.agent", "--broker", backend, "--workers", str(n), "--heartbeat", str(self.heartbeat),
                "--liveness", str(self.liveness), "--log-level", self.log_level, *self.agent_args]
        if name:
            args += ["--name", name]
        proc = spawn_daemon(args, env=self._env)
        self.agents.append(proc)
        if wait:
            self.wait_for_workers(self.status()["workers"] + n)
        return proc

    def kill_agent(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the agent alone (its workers die with it by their death signal)."""
        proc.send_signal(sig)

    def worker_pids(self, agent: subprocess.Popen[bytes] | None = None) -> list[int]:
        """The worker processes of one agent, or of all."""
        return [w.pid for w in self._workers(agent)]

    def _workers(self, agent: subprocess.Popen[bytes] | None = None) -> list[psutil.Process]:
        agents = [agent] if agent else self.agents
        workers: list[psutil.Process] = []
        for a in agents:
            try:
                workers += psutil.Process(a.pid).children()
            except psutil.NoSuchProcess:
                pass
        return workers

    # ------------------------------------------------------------------ queries

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return broker_status(self.frontend, timeout, self._creds, insecure=self.insecure)

    def wait_for_workers(self, n: int, timeout: float = 20.0) -> None:
        def enough() -> bool:
            try:
                workers: int = self.status(1.0)["workers"]
            except BrokerUnavailable:
                return False
            return workers >= n
        wait_for(enough, timeout, 0.02, f"{n} workers registered")

    def client(self, **kwargs: Any) -> Client:
        if self.secret:
            kwargs.setdefault("secret", self.secret)
        if self.insecure:
            kwargs.setdefault("insecure", True)
        client = Client(self.frontend, **kwargs)
        self._clients.append(client)
        return client

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the daemons and their workers."""
        procs = []
        for p in [self.broker, *self.agents]:
            if p is None:
                continue
            try:
                proc = psutil.Process(p.pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    procs += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return procs

    # ------------------------------------------------------------------ teardown

    def stop(self, timeout: float = 10.0) -> list[psutil.Process]:
        """Stop everything; returns the processes that had to be killed after ``timeout``."""
        for client in self._clients:
            client.close()
        workers = self._workers()  # kept as Process objects: one that exits meanwhile is no error
        daemons = [p for p in [*self.agents, self.broker] if p is not None]
        stop_processes(daemons, timeout)
        _, alive = psutil.wait_procs(workers, timeout=timeout)
        for proc in alive:
            proc.kill()
        for p in daemons:  # their process groups, in case anything else was started there
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.agents, self.broker = [], None
        return alive

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
