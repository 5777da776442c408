"""bench_peers.py's systems: one adapter each, over bench_core's ``Tool`` (start, first, stop, submit_all, map, call).

multiprocessing.Pool, ProcessPoolExecutor, loky and zpar are bench_core's
own adapters (Pool and zpar gain ``imap_unordered``); Parallel Python, Dask
and Ray are here. A system without a ``chunksize`` (pp, Dask, Ray) maps N
items at chunksize c as N/c tasks of ``map_chunk`` over c items each: what
``Pool.map`` does inside. ``SYSTEMS`` lists them in the table's order.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

# benchmarks/ is on sys.path
from _cluster import kill_leftovers
from _peers_tasks import map_chunk, pp_chunk
from _tasks import noop
from bench_core import ExecutorTool, LokyTool, PoolTool, Tool, ZparTool

import zpar
from zpar._embedded import stop_processes


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def flat(parts: Iterable[list[Any]]) -> list[Any]:
    return [x for part in parts for x in part]


class ImapUnordered:
    """A system whose handle has ``imap_unordered(fn, items, chunksize=)`` (Pool's, zpar's Client's)."""

    h: Any

    def imap_unordered(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> Iterable[Any]:
        results: Iterable[Any] = self.h.imap_unordered(fn, items, chunksize=chunksize)
        return results


class PoolPeer(ImapUnordered, PoolTool):
    pass


class ZparPeer(ImapUnordered, ZparTool):
    def hub(self) -> psutil.Process:
        """The embedded hub (broker + agent in one process; the workers are its children)."""
        procs = self.h._cluster.procs  # private: the client exposes no pid, and only this benchmark needs it
        hub = psutil.Process(procs[0].pid)
        if "zpar_broker.embedded" not in " ".join(hub.cmdline()):
            raise RuntimeError(f"pid {hub.pid} is not the embedded hub: {hub.cmdline()}")
        return hub


class PpTool(Tool):
    """Parallel Python: ``pp.Server(ncpus=W)``; it ships each function's source text, not a pickle."""

    name = "pp"

    def start(self) -> Any:
        import pp
        return pp.Server(ncpus=self.workers, loglevel=logging.ERROR)  # type: ignore[no-untyped-call]

    def first(self, h: Any) -> Any:
        return h.submit(noop, (1,))()

    def stop(self, h: Any) -> None:
        h.destroy()

    def submit_all(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        jobs = [self.h.submit(fn, (a,)) for a in args]
        return [job() for job in jobs]

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        if chunksize == 1:
            return self.submit_all(fn, items)
        jobs = [self.h.submit(pp_chunk, (fn.__name__, c), depfuncs=(fn,)) for c in chunks(items, chunksize)]
        return flat(job() for job in jobs)

    def call(self, fn: Callable[..., Any], arg: Any) -> Any:
        # pp ships the source of an argument's class unless its module is named for the worker to import
        module = type(arg).__module__.split(".")[0]
        return self.h.submit(fn, (arg,), modules=() if module == "builtins" else (module,))()


class DaskTool(Tool):
    """Dask's distributed scheduler on a ``LocalCluster`` of W single-threaded worker processes."""

    name = "Dask"

    def start(self) -> Any:
        from dask.distributed import Client, LocalCluster
        logging.getLogger("distributed").setLevel(logging.ERROR)  # its start-up chatter
        warnings.filterwarnings("ignore", module="distributed")  # "Large object ... detected in task graph"
        cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,  # type: ignore[no-untyped-call]
                               processes=True, dashboard_address=None)
        try:
            return Client(cluster)  # type: ignore[no-untyped-call]
        except BaseException:
            cluster.close()
            raise

    def first(self, h: Any) -> Any:
        return h.submit(noop, 1, pure=False).result()

    def stop(self, h: Any) -> None:
        cluster = h.cluster
        h.close()
        cluster.close()

    def submit_all(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        futs = [self.h.submit(fn, a, pure=False) for a in args]  # pure=False: equal arguments are distinct tasks
        return list(self.h.gather(futs))

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        if chunksize == 1:
            return list(self.h.gather(self.h.map(fn, items, pure=False)))
        parts = chunks(items, chunksize)
        return flat(self.h.gather(self.h.map(map_chunk, [fn] * len(parts), parts, pure=False)))

    def call(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.h.submit(fn, arg, pure=False).result()


class RayTool(Tool):
    """Ray: a fresh local cluster (``ray.init(address="local", num_cpus=W)``), functions as ``ray.remote`` tasks."""

    name = "Ray"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.remote: dict[Callable[..., Any], Any] = {}

    def start(self) -> Any:
        import ray
        ray.init(address="local", num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        return ray

    def first(self, h: Any) -> Any:
        return h.get(self.task(noop).remote(1))

    def stop(self, h: Any) -> None:
        h.shutdown()

    def task(self, fn: Callable[..., Any]) -> Any:
        if fn not in self.remote:
            import ray
            self.remote[fn] = ray.remote(fn)
        return self.remote[fn]

    def submit_all(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        remote = self.task(fn).remote
        return list(self.h.get([remote(a) for a in args]))

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        if chunksize == 1:
            return self.submit_all(fn, items)
        remote = self.task(map_chunk).remote
        return flat(self.h.get([remote(fn, c) for c in chunks(items, chunksize)]))

    def call(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.h.get(self.task(fn).remote(arg))


class ZparCliTool(Tool):
    """zpar over loopback TCP: a real ``zpar-broker`` and ``zpar-agent`` started from their CLIs, and a Client.

    Neither is given a secret, so all three use this user's own: CurveZMQ
    and the ZAP check on every hop (call ``_cluster.private_config_home()``
    first, so the benchmark makes its own rather than the caller's).
    """

    name = "zpar"

    def __init__(self, workers: int, log_path: str) -> None:
        super().__init__(workers)
        self.log_path = log_path  # the daemons' stderr: their logs stay out of the report

    def start(self) -> Any:
        frontend, backend, collector = (f"tcp://127.0.0.1:{port}" for port in free_ports(3))
        bindir = os.path.dirname(sys.executable)
        commands = [[os.path.join(bindir, "zpar-broker"), "--frontend", frontend, "--backend", backend,
                     "--collector", collector],
                    [os.path.join(bindir, "zpar-agent"), "--broker", backend, "--workers", str(self.workers)]]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with open(self.log_path, "ab") as log:
                for cmd in commands:
                    procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                  start_new_session=True))
            client = zpar.Client(frontend, connect_timeout=30)
        except BaseException:
            stop_processes(procs)
            raise
        try:
            client.wait_for_workers(self.workers, timeout=30)
        except BaseException:
            client.close()
            stop_processes(procs)
            raise
        return client, procs

    def first(self, h: Any) -> Any:
        return h[0].submit(noop, 1).result()

    def stop(self, h: Any) -> None:
        client, procs = h
        try:
            client.close()
        finally:
            stop_processes(procs)

    def call(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.h[0].submit(fn, arg).result()


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free just now (the kernel's choice, so two runs do not collide)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class System:
    key: str  # what --systems names
    module: str | None  # what must be importable; None: the standard library or zpar
    make: Callable[[int], Tool]


SYSTEMS = [
    System("pool", None, PoolPeer),
    System("ppe", None, ExecutorTool),
    System("loky", "loky", LokyTool),
    System("pp", "pp", PpTool),
    System("dask", "distributed", DaskTool),
    System("ray", "ray", RayTool),
    System("zpar", None, ZparPeer),
]


def missing(system: System) -> str | None:
    """Why ``system`` cannot run here (None if it can)."""
    if system.module is None or importlib.util.find_spec(system.module) is not None:
        return None
    return f"{system.module} is not installed (pip install -e '.[bench]' installs it)"


class ChildWatch(threading.Thread):
    """Remembers every process this one starts, however deep, so that all can be killed at the end.

    Dask's and Ray's daemons may outlive a failed shutdown, and Ray's may be
    re-parented: they are noted while they are still our descendants.
    """

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(name="child-watch", daemon=True)
        self.interval = interval
        self.seen: dict[int, psutil.Process] = {}
        self.done = threading.Event()

    def snapshot(self) -> None:
        try:
            for p in psutil.Process(os.getpid()).children(recursive=True):
                self.seen.setdefault(p.pid, p)  # psutil.Process checks the pid's start time before a kill
        except psutil.Error:
            pass

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.snapshot()

    def kill_all(self, grace: float = 5.0) -> dict[int, str]:
        """Stops watching; kills what is left (after ``grace`` s) and returns it: pid -> command line."""
        self.done.set()
        self.snapshot()
        return kill_leftovers(self.seen.values(), grace)
