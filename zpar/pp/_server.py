"""Parallel Python's ``Server`` over zpar clients (see zpar.pp)."""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any, Self

from .. import __version__ as _zpar_version
from ..client import Client
from ..config import usable_cores
from ..errors import BrokerUnavailable, ConfigError
from ._call import CallCache, pack
from ._job import DestroyedServerError, Job, Statistics
from ._nodes import DISCOVER, REFRESH_INTERVAL, Node, NodeState, broker_address, least_loaded

log = logging.getLogger(__name__)

version = f"1.7.0 (zpar {_zpar_version})"  # pp.version, as pp 1.7 spells it


class Server:
    """Parallel Python's job server, running jobs on zpar.

    ``ncpus``: local workers ("autodetect": one per usable core; 0: remote
    nodes only). ``ppservers``: a tuple of zpar brokers, each
    "host", "host:port" or "tcp://host:port" (a bare host means port 5555),
    or "*": the broker announced on the LAN whose key matches ``secret``.
    ``secret`` goes to their clients. ``strict``: ``job()`` raises the job's
    exception instead of printing it and returning None. ``connect_timeout``:
    seconds to wait for each broker at start; one that does not answer is
    logged and tried again in the background, as pp did. ``broker_timeout``:
    seconds a connected broker may be away before the jobs it holds are
    handed to other nodes (as pp rescheduled the jobs of a lost ppserver).
    """

    def __init__(self, ncpus: int | str = "autodetect", ppservers: tuple[str, ...] = (),
                 secret: str | bytes | None = None,
                 restart: bool = False, proto: int = 4, socket_timeout: float = 3600, loglevel: int | str | None = None,
                 broadcast: str | None = None, *, strict: bool = False, connect_timeout: float = 5.0,
                 broker_timeout: float = 30.0) -> None:
        if not isinstance(ppservers, tuple):
            raise TypeError("ppservers argument must be a tuple")
        if secret is not None and not isinstance(secret, (str, bytes)):
            raise TypeError("secret must be of a string type")
        remotes = dict(broker_address(entry) for entry in ppservers)
        if loglevel is not None:
            log.setLevel(loglevel)
        if restart and remotes:
            log.warning("restart=True applies to the local workers; a broker's agents restart theirs after "
                        "each job when started with `zpar-agent --max-tasks-per-worker 1`")
        self.strict = strict
        self._restart = restart
        self._secret, self._connect_timeout, self._broker_timeout = secret, connect_timeout, broker_timeout
        self._cond = threading.Condition()
        self._resize_lock = threading.Lock()
        self._queue: collections.deque[Job] = collections.deque()
        self._open: set[Job] = set()
        self._groups: collections.Counter[str] = collections.Counter()
        self._nodes: list[Node] = []  # local first: it wins ties, as pp preferred local workers
        self._retiring: list[Node] = []
        self._local: Node | None = None
        self._stats: dict[str, Statistics] = {"local": Statistics(0)}  # "local"'s ncpus: get_ncpus()
        self._tids = itertools.count()
        self._calls = CallCache()
        self._closing = self._warned_idle = False
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._dispatcher: threading.Thread | None = None
        self._monitor: threading.Thread | None = None
        _live_servers.add(self)
        try:
            self.set_ncpus(ncpus)
            remote_nodes = [Node(name, address) for name, address in remotes.items()]
            self._nodes += remote_nodes
            errors: list[Exception] = []
            connecting = [threading.Thread(target=self._connect, args=(node, errors), daemon=True)
                          for node in remote_nodes]
            for thread in connecting:
                thread.start()
            for thread in connecting:
                thread.join()
            if errors:  # a refused or malformed secret: waiting will not mend it
                raise errors[0]
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="zpar-pp-dispatch", daemon=True)
            self._dispatcher.start()
            if remote_nodes:
                self._monitor = threading.Thread(target=self._monitor_loop, args=(remote_nodes,),
                                                 name="zpar-pp-monitor", daemon=True)
                self._monitor.start()
        except BaseException:
            self.destroy()
            raise
        log.info("pp server started with %d local workers and %d zpar brokers", self.get_ncpus(), len(remotes))

    # ------------------------------------------------------------------ jobs

    def submit(self, func: Callable[..., Any], args: tuple[Any, ...] = (), depfuncs: tuple[Any, ...] = (),
               modules: tuple[str, ...] = (), callback: Callable[..., Any] | None = None,
               callbackargs: tuple[Any, ...] = (), group: str = "default",
               globals: dict[str, Any] | None = None) -> Job:
        """Queue ``func(*args)``; returns its Job at once.

        ``depfuncs`` (functions and classes) and ``modules`` (names) are bound
        as globals of ``func`` in the worker where missing, and so are the
        modules, functions and classes of ``globals``. When the job finishes,
        ``callback(*callbackargs, result)`` runs in a thread of its own.
        Raises TypeError for pp's argument mistakes, SerializationError if the
        function or an argument cannot be pickled, DestroyedServerError after ``destroy()``.
        """
        if self._closing:
            raise DestroyedServerError("cannot submit jobs: this Server has been destroyed")
        for name, value in (("args", args), ("depfuncs", depfuncs), ("modules", modules),
                            ("callbackargs", callbackargs)):
            if not isinstance(value, tuple):
                raise TypeError(f"{name} argument must be a tuple")
        if not all(isinstance(m, str) for m in modules):
            raise TypeError("modules argument must be a tuple of module names (strings)")
        if globals is not None and not isinstance(globals, dict):
            raise TypeError("globals argument must be a dictionary")
        if isinstance(func, types.MethodType):  # as pp: the instance travels with each job, so its state is current
            method: types.MethodType = func
            func, args = method.__func__, (method.__self__, *args)
        call = self._calls.get(func, depfuncs, modules, globals)
        job = Job(next(self._tids), call, pack(args), callback, callbackargs, group, strict=self.strict,
                  on_finish=self._job_finished)
        with self._cond:
            if self._closing:
                raise DestroyedServerError("cannot submit jobs: this Server has been destroyed")
            self._queue.append(job)
            self._open.add(job)
            self._groups[group] += 1
            idle = not self._nodes and not self._warned_idle
            self._warned_idle |= idle
            self._cond.notify_all()
        if idle:
            log.warning("pp job %d waits: this Server has no local workers (ncpus=0) and no ppservers; "
                        "call set_ncpus(n) to run it", job.tid)
        return job

    def wait(self, group: str | None = None, timeout: float | None = None) -> bool:
        """Wait until every job (of ``group``, if given) has finished and its callback returned.

        Returns False if ``timeout`` seconds passed first; returns at once once the Server is destroyed.
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closing or not (self._groups[group] if group else self._open), timeout)

    def _job_finished(self, job: Job) -> None:
        with self._cond:
            if job in self._open:
                self._open.discard(job)
                self._groups[job.group] -= 1
                if not self._groups[job.group]:
                    del self._groups[job.group]
            self._cond.notify_all()

    # ------------------------------------------------------------------ dispatch

    def _dispatch_loop(self) -> None:
        """Hand queued jobs to nodes with room; close replaced local clusters once they hold no job."""
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    drained = [n for n in self._retiring if n.inflight == 0]
                    for node in drained:
                        self._retiring.remove(node)
                    work = self._take_work()
                    if drained or work:
                        break
                    self._cond.wait()
            for node in drained:
                if node.client is None:  # only local nodes retire, and they have a client
                    raise RuntimeError(f"pp node {node.name} retired without a client")
                node.client.close()
                log.info("a replaced local cluster finished its jobs and stopped")
            for job, node in work:
                self._send(job, node)

    def _take_work(self) -> list[tuple[Job, Node]]:
        """Pairs of (job, node) to send, the nodes' counts taken; called with the lock held."""
        work = []
        while self._queue:
            node = least_loaded(self._nodes)
            if node is None:
                break
            job = self._queue.popleft()
            node.inflight += 1
            self._stats[node.name].njobs += 1
            work.append((job, node))
        return work

    def _send(self, job: Job, node: Node) -> None:
        call, frames = job.call, job.frames
        if node.client is None:  # only a ready node gets work, and a ready node has a client
            raise RuntimeError(f"pp job {job.tid} was given to node {node.name}, which has no client")
        if call is None:  # only destroy() settles a queued job
            raise RuntimeError(f"pp job {job.tid} was settled before it was sent")
        job.sent = time.monotonic()
        try:
            future = node.client.submit(call, *frames)
        except Exception as exc:  # noqa: BLE001  (a stopped client: this job fails, the others go on)
            log.warning("could not hand pp job %d to %s: %s", job.tid, node.name, exc)
            with self._cond:
                node.inflight -= 1
                self._cond.notify_all()
            job.settle(error=exc)
            return
        future.add_done_callback(functools.partial(self._on_done, job, node))

    def _on_done(self, job: Job, node: Node, future: concurrent.futures.Future[tuple[Any, str, float]]) -> None:
        """Runs in the client's I/O thread: record, requeue a job lost with its broker, settle the rest."""
        try:
            if future.cancelled():  # only destroy() cancels (a retiring node is closed once empty)
                with self._cond:
                    node.inflight -= 1
                job.settle(destroyed=True)
                return
            error = future.exception()
            with self._cond:
                node.inflight -= 1
                stats = self._stats[node.name]
                if isinstance(error, BrokerUnavailable) and not self._closing:
                    # pp rescheduled a job whose node was lost; until the broker answers again
                    # (the monitor asks), the node gets nothing new.
                    log.warning("pp job %d requeued: %s", job.tid, error)
                    node.capacity = 0
                    stats.njobs -= 1
                    self._queue.appendleft(job)
                    self._cond.notify_all()
                    return
                if error is None:
                    value, output, took = future.result()
                    stats.time += took
                    stats.rtime += time.monotonic() - job.sent
                self._cond.notify_all()
            if error is None:
                job.settle(value, None, output)
            else:
                job.settle(error=error, output=getattr(error, "pp_output", ""))
        except Exception as exc:  # never leave a job unsettled: job() would wait forever
            log.exception("pp job %d: its result could not be handled", job.tid)
            job.settle(error=exc)

    # ------------------------------------------------------------------ remote brokers

    def _connect(self, node: Node, errors: list[Exception] | None = None) -> None:
        """Connect to a remote broker; one that does not answer is tried again later.

        Other failures (a bad secret, refused credentials) go to ``errors`` if
        given (the constructor raises them), else they are logged once.
        """
        if node.address is None:  # only remote nodes connect
            raise RuntimeError(f"pp node {node.name} has no broker address to connect to")
        try:
            found = node.address == DISCOVER  # "*": the broker announced on the LAN (zpar._discovery)
            client = Client(None if found else node.address, secret=self._secret, discover=found,
                            connect_timeout=self._connect_timeout, broker_timeout=self._broker_timeout)
        except BrokerUnavailable as exc:
            if not node.warned:
                log.warning("%s; its jobs go to other nodes meanwhile, and it is tried again every %g s",
                            exc, REFRESH_INTERVAL)
                node.warned = True
            return
        except Exception as exc:
            if errors is not None:
                errors.append(exc)
            elif not node.warned:
                log.exception("cannot connect to the zpar broker at %s; tried again every %g s",
                              node.address, REFRESH_INTERVAL)
                node.warned = True
            return
        try:
            workers = client.status(self._connect_timeout)["workers"]
        except BrokerUnavailable:
            workers = 0
        with self._cond:
            closing = self._closing
            if not closing:
                node.client, node.capacity, node.state = client, workers, NodeState.READY
                self._stats.setdefault(node.name, Statistics(workers)).ncpus = workers
                self._cond.notify_all()
        if closing:  # destroy() came meanwhile
            client.close()
            return
        log.info("connected to the zpar broker at %s (%d workers)", client.address, workers)

    def _monitor_loop(self, nodes: list[Node]) -> None:
        """Connect the brokers that did not answer yet; follow the worker counts of the others."""
        while not self._stop.wait(REFRESH_INTERVAL):
            for node in nodes:
                if self._closing:
                    return
                if node.client is None:
                    self._connect(node)
                    continue
                try:
                    workers = node.client.status(REFRESH_INTERVAL)["workers"]
                except (BrokerUnavailable, RuntimeError):
                    workers = 0
                with self._cond:
                    if workers != node.capacity:
                        node.capacity = self._stats[node.name].ncpus = workers
                        self._cond.notify_all()

    # ------------------------------------------------------------------ pool size and statistics

    def get_ncpus(self) -> int:
        """The number of local workers."""
        return self._stats["local"].ncpus

    def set_ncpus(self, ncpus: int | str = "autodetect") -> None:
        """Resize the local pool, as pp does ("autodetect": one worker per usable core; 0: remote nodes only);
        on a Server with ppservers, a number of 1 or more also resizes the cluster, live.

        Local: a new embedded cluster of that size takes every job not yet
        handed out; the old one finishes the jobs it holds, then stops.

        Cluster: every node of every connected broker keeps ``ncpus`` workers
        from now on, as if its agent had been started with ``zpar-agent
        --workers ncpus`` (pp's ``ppserver.py -w ncpus``): more start at once
        and take queued jobs, and those past it stop once their job is done,
        so no job is lost. Returns once each broker shows its nodes at that
        size (one that does not answer, or not within ``connect_timeout``, is
        logged and left as it is). "autodetect" and 0 leave the nodes as they are (each
        agent's default is its own machine's cores, and a node keeps at least
        one worker); so do brokers not connected yet and nodes that join
        later. Raises AuthenticationError if a broker lets no client resize
        its nodes (key files, unless started with ``--allow-client-scale``).
        """
        per_node = ncpus if isinstance(ncpus, int) and not isinstance(ncpus, bool) and ncpus > 0 else 0
        if ncpus == "autodetect":
            ncpus = usable_cores()
        if not isinstance(ncpus, int) or isinstance(ncpus, bool):
            raise TypeError("ncpus must have 'int' type")
        if ncpus < 0:
            raise ConfigError(f"ncpus must be an integer >= 0, not {ncpus}")
        with self._resize_lock:
            if per_node:
                with self._cond:
                    brokers = [n for n in self._nodes if n.address is not None and n.client is not None]
                for node in brokers:
                    self._resize_broker(node, per_node)
            if self._closing or ncpus == self.get_ncpus():  # (a local node exists iff ncpus > 0)
                return
            recycle: dict[str, Any] = {"max_tasks_per_worker": 1} if self._restart else {}  # a worker per job
            new = Node("local", None, Client(workers=ncpus, **recycle), ncpus) if ncpus else None
            with self._cond:
                if self._closing:
                    closing_new = new
                else:
                    closing_new = None
                    old, self._local = self._local, new
                    if old is not None:
                        self._nodes.remove(old)
                        old.state = NodeState.RETIRING
                        self._retiring.append(old)
                    if new is not None:
                        self._nodes.insert(0, new)
                    self._stats["local"].ncpus = ncpus
                    self._cond.notify_all()
            if closing_new is not None and closing_new.client is not None:
                closing_new.client.close()

    def _resize_broker(self, node: Node, workers: int) -> None:
        """Every node of the broker behind ``node`` to ``workers`` workers (Client.scale), and wait until its
        status shows them all so; a broker that does not answer in time is logged and keeps its size."""
        client = node.client
        if client is None:
            return
        deadline = time.monotonic() + self._connect_timeout
        try:
            # As the monitor asks: a broker away (its jobs wait for it) costs this call a second, not more.
            names = [n["name"] for n in client.status(REFRESH_INTERVAL)["nodes"]]
            for name in list(names):
                try:
                    client.scale(name, workers, wait=False, timeout=max(0.1, deadline - time.monotonic()))
                except ConfigError:  # it left meanwhile
                    names.remove(name)

            def sizes(info: dict[str, Any]) -> dict[str, int]:
                return {n["name"]: n["workers"] for n in info["nodes"]}

            info = client._until(lambda info: all(sizes(info).get(name, workers) == workers for name in names),
                          deadline - time.monotonic(),  # (a node that left is done)
                          lambda info: f"its nodes have {sizes(info)} workers after {self._connect_timeout:g} s")
        except (BrokerUnavailable, TimeoutError, RuntimeError) as exc:  # RuntimeError: its client stopped
            log.warning("could not resize the nodes of the zpar broker at %s to %d workers: %s", client.address,
                        workers, exc)
            return
        with self._cond:
            node.capacity = self._stats[node.name].ncpus = info["workers"]
            self._cond.notify_all()
        log.info("the %d nodes of the zpar broker at %s keep %d workers each", len(names), client.address, workers)

    def get_active_nodes(self) -> dict[str, int]:
        """``{node: workers}``: "local" always, and every remote broker that has workers."""
        with self._cond:
            active = {"local": self.get_ncpus()}
            active.update({n.name: n.capacity for n in self._nodes
                           if n.address is not None and n.state is NodeState.READY and n.capacity})
            return active

    def get_stats(self) -> dict[str, Statistics]:
        """``{node: Statistics}`` (copies): workers, jobs handed to it, and their time."""
        with self._cond:
            return {name: dataclasses.replace(stats) for name, stats in self._stats.items()}

    def print_stats(self) -> None:
        """Print the job statistics to stdout, in pp's table."""
        stats = self.get_stats()
        with self._cond:
            active = sum(n.inflight for n in (*self._nodes, *self._retiring))
        total = sum(s.njobs for s in stats.values())
        print("Job execution statistics:", flush=True)
        print(" job count | % of all jobs | job time sum | time per job | job server", flush=True)
        for name, s in stats.items():
            if s.njobs:
                print(f"    {s.njobs:6d} |        {100.0 * s.njobs / total:6.2f} |     {s.time:8.4f} |  "
                      f"{s.time / s.njobs:11.6f} | {name}", flush=True)
        print("Time elapsed since server creation", time.monotonic() - self._started, flush=True)
        print(active, "active tasks,", self.get_ncpus(), "cores", flush=True)
        print(flush=True)

    # ------------------------------------------------------------------ lifetime

    def destroy(self) -> None:
        """Stop the local cluster and disconnect from the brokers.

        Jobs not finished by then end with DestroyedServerError from ``job()``.
        Also called at exit for every Server not destroyed.
        """
        with self._cond:
            if self._closing:
                return
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._stop.set()
        for thread in (self._dispatcher, self._monitor):
            if thread is not None and thread is not threading.current_thread():
                thread.join(self._connect_timeout + 10)
        with self._cond:
            nodes, self._nodes, self._retiring = [*self._nodes, *self._retiring], [], []
            self._local = None
        for node in nodes:
            if node.client is not None:
                node.client.close()  # cancels what it holds: those jobs settle as destroyed
        with self._cond:
            unfinished = [*queued, *self._open]
        for job in unfinished:
            job.settle(destroyed=True)
        _live_servers.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        state = "destroyed" if self._closing else f"{self.get_ncpus()} local workers"
        remotes = [n.name for n in self._nodes if n.address is not None]
        return f"<zpar.pp.Server {state}{', brokers ' + ', '.join(remotes) if remotes else ''}>"


_live_servers: weakref.WeakSet[Server] = weakref.WeakSet()


@atexit.register
def _destroy_all() -> None:
    for server in list(_live_servers):
        server.destroy()
