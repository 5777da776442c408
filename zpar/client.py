"""The producer API: ``zpar.Client``.

User threads pickle their tasks and hand them to one I/O thread (_connection.py)
through a deque and a wake-up pipe; only that thread touches the ZeroMQ
socket. Its rules live in a sans-I/O core (_producer.py): it batches whatever
piled up into SUBMIT messages, resolves futures as RESULT batches come back,
and sends unfinished tasks again if the broker restarts.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Self

import zmq

from . import _progress, _refs, _shm, config, security, serialize
from . import protocol as P
from ._connection import Connection
from ._embedded import EmbeddedCluster
from ._maps import MapOptions, Results, over
from ._pending import PendingTask, Window
from ._wrappers import Wrappers, function_name, identity
from .errors import AuthenticationError, BrokerUnavailable, ConfigError, ProtocolError, SerializationError, ZparError
from .futures import Future
from .options import TaskOptions

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 10_000
_NAMES = 4096  # function names a client remembers (for the broker's task history)


class _Unset:
    """A keyword argument not given (None means something for ``timeout``)."""


_UNSET = _Unset()
_NO_KWARGS: dict[str, Any] = {}  # a map's calls: pickled at once, never changed


class Submitter:
    """``submit``, ``start`` and the maps of one client, with one set of TaskOptions.

    A Client is one (with the options it was made with); ``client.options(...)``
    returns others that share its connection.
    """

    def __init__(self, client: Client, opts: TaskOptions) -> None:
        self._client, self._opts = client, opts

    def options(self, *, timeout: float | _Unset | None = _UNSET, retries: int | _Unset = _UNSET,
                retry_on: tuple[type[BaseException], ...] | _Unset = _UNSET, priority: int | _Unset = _UNSET,
                resources: Mapping[str, float] | _Unset = _UNSET,
                resource_timeout: float | _Unset | None = _UNSET) -> Submitter:
        """The same client, submitting with other TaskOptions (the rest as they are; see TaskOptions)::

            client.options(timeout=5).submit(fn, x, timeout="passed to fn")
            client.options(priority=10).submit(urgent)
            client.options(resources={"gpu": 1}).submit(train, model)
        """
        changes: dict[str, Any] = {k: v for k, v in (
            ("timeout", timeout), ("retries", retries), ("retry_on", retry_on), ("priority", priority),
            ("resources", resources), ("resource_timeout", resource_timeout)) if v is not _UNSET}
        return Submitter(self._client, dataclasses.replace(self._opts, **changes))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; returns its Future.

        Every keyword argument goes to ``fn``; set zpar's own options with
        ``client.options(...)``. Raises SerializationError (a TypeError)
        naming the function or argument that cannot be pickled, before
        anything is sent.
        """
        return self._client._submit(fn, (args, kwargs), 0, self._opts)

    def start(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(channel, *args, **kwargs)`` on a worker; returns its Future.

        ``channel`` is the task's ``zpar.streaming.Channel``; the Future is the
        producer's end: ``send()``, ``receive()``, ``stream()``,
        ``close_input()``, ``result()`` (see ``zpar.streaming``). A cancel
        stops the task.
        """
        fut = self._client._submit(fn, (args, kwargs), P.FLAG_CHANNEL, self._opts)
        fut._stream_state()  # a channel task from the start (a cancel stops it)
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int | None = None,
            timeout: float | None = None, progress: bool | str = False) -> Iterator[Any]:
        """``fn`` over the zipped iterables; yields results in input order.

        Input is consumed lazily, a bounded window ahead of the results, so a
        generator of any length works in bounded memory. ``chunksize`` items
        travel as one task. Raises TimeoutError if a result is not in by
        ``timeout`` seconds after the call, and the task's own exception if
        one raised. Leaving the loop early cancels what is still pending.
        ``progress``: draw a bar of the results handed out (a string: its
        label), out of the input's length when it has one (see zpar.progress).
        """
        return self._map(fn, iterables, chunksize, MapOptions(window=self._client.window, timeout=timeout),
                         progress)

    imap = map

    def imap_unordered(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int | None = None,
                       timeout: float | None = None, progress: bool | str = False) -> Iterator[Any]:
        """Like ``map``, but yields each result as soon as it is in."""
        return self._map(fn, iterables, chunksize,
                         MapOptions(ordered=False, window=self._client.window, timeout=timeout), progress)

    def _map(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], chunksize: int | None,
             options: MapOptions, progress: bool | str) -> Iterator[Any]:
        total = _progress.known_length(iterables) if progress else None  # before the map reads any of them
        work = over(fn, iterables, chunksize, self._client._wrappers)
        results = Results(self._map_submit(work.task), work, options)
        if not progress:
            return results
        label = progress if isinstance(progress, str) else function_name(fn)
        return _progress.track(results, total, label)

    def _map_submit(self, task: Callable[..., Any]) -> Callable[..., Future]:
        """``submit`` for the tasks of one map: ``task``'s pickle is looked up once, not once per item."""
        client, opts = self._client, self._opts
        pickled = client._funcs.get(task, *identity(task))  # the map holds ``task``: its pickle stays right

        def submit(fn: Callable[..., Any], *args: Any) -> Future:
            return client._submit(fn, (args, _NO_KWARGS), 0, opts, pickled if fn is task else None)

        return submit


    def __repr__(self) -> str:
        return f"<{self._client!r} with {self._opts}>"


class Client(Submitter):
    """Runs functions on a zpar cluster.

    ``Client()`` starts a private cluster on this machine (one worker per
    core, or ``workers``) and stops it on ``close()``, at the end of a
    ``with`` block, or at exit. ``Client("tcp://host:5555")`` connects to a
    running ``zpar-broker``. A client still open when the interpreter exits
    is closed then: what it has pending is cancelled, not waited for (a
    ``zpar.Executor``, as the stdlib's, waits for its tasks at exit).

    ``window`` bounds the tasks in flight: ``submit`` blocks past it, so a
    fast producer cannot fill memory. Raises BrokerUnavailable when no broker
    answers within ``connect_timeout`` seconds. A task lost to a dead worker,
    node or broker runs again up to ``retries`` times; if the broker is away
    longer than ``broker_timeout`` seconds, pending futures fail with
    BrokerUnavailable. ``timeout`` (seconds) stops any task that runs longer.
    ``max_tasks_per_worker`` (embedded only) replaces a worker after that many tasks.
    ``resources`` (embedded only) is what its node offers tasks that ask for
    resources (``{"gpu": 1}`` or ``"gpu=1,memory=8GiB"``, as ``zpar-agent --resources``).

    A cluster started with a shared secret needs the same ``secret`` here
    (or a ``secret_file``; or ``key_file`` and ``broker_key`` for one started
    with key files). With none given, the ``ZPAR_SECRET``, ``ZPAR_SECRET_FILE``,
    ``ZPAR_KEY_FILE`` and ``ZPAR_BROKER_KEY`` variables are read. A broker
    that refuses them raises AuthenticationError, within a second or so.

    ``discover=True`` finds the broker on the LAN instead (``zpar broker``
    announces itself over mDNS), within ``connect_timeout``: the one whose
    announced key fingerprint matches these credentials; ``discover="NAME"``
    only the broker of that cluster (needed when several match). The
    CurveZMQ handshake still authenticates what was found.
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None,
                 window: int = DEFAULT_WINDOW, connect_timeout: float = 10.0, timeout: float | None = None,
                 retries: int = 3, broker_timeout: float = 30.0, max_tasks_per_worker: int = 0,
                 secret: str | bytes | None = None, secret_file: str | None = None, key_file: str | None = None,
                 broker_key: str | None = None, insecure: bool = False, discover: bool | str = False,
                 resources: str | Mapping[str, float] | None = None) -> None:
        if window < 1:
            raise ConfigError(f"window must be at least 1, not {window}")
        if not broker_timeout > 0:
            raise ConfigError(f"broker_timeout must be a positive number of seconds, not {broker_timeout!r}")
        super().__init__(self, TaskOptions(timeout=timeout, retries=retries))
        self._wrappers = Wrappers(None)  # map's chunks: one Chunk per function, pickled once per client
        self._cluster: EmbeddedCluster | None = None
        found = None  # the broker that discovery found, named if it then refuses us
        if discover:
            if address is not None:
                raise ConfigError(f"give the broker's address ({address}) or discover=, not both")
            from . import _discovery  # zeroconf only for a client that asks

            found = _discovery.find("producer", _credentials(secret, secret_file, key_file, broker_key, insecure),
                                    discover if isinstance(discover, str) else "", connect_timeout)
            address = found.address("producer", _discovery.local_networks())
        if address is None:
            offered = config.parse_resources(resources) if resources is not None else ()
            self._cluster = EmbeddedCluster(workers, max_tasks_per_worker=max_tasks_per_worker, resources=offered)
            address = self._cluster.frontend
        elif resources is not None:
            raise ConfigError("resources= is what the embedded cluster's node offers; a remote cluster's agents "
                              "say theirs (zpar-agent --resources gpu=1)")
        elif workers is not None:
            raise ConfigError("workers= sets the size of the embedded cluster; a remote cluster's "
                              "size is set by its agents (zpar-agent --workers N)")
        elif max_tasks_per_worker:
            raise ConfigError("max_tasks_per_worker= recycles the embedded cluster's workers; a remote "
                              "cluster's agents set it (zpar-agent --max-tasks-per-worker N)")
        self.address = address
        # On the embedded cluster's host, large arguments go through shared memory (zpar._shm).
        shm_dir = self._cluster.shm_dir if self._cluster else None
        self._shm = _shm.Space(shm_dir, handoff=False) if shm_dir else None
        # With nothing given: this user's own secret; plaintext only when asked for (insecure=True).
        creds = None if self._cluster else _credentials(secret, secret_file, key_file, broker_key, insecure, address)
        self._creds = creds
        self._window = Window(window)
        self._window_size = window
        self._funcs = serialize.FunctionCache()
        self._names: dict[bytes, str] = {}  # function digest -> its name, for the broker's task history
        self._ids = itertools.count(1)
        self._submits: collections.deque[PendingTask] = collections.deque()
        self._cancels: collections.deque[tuple[int, bool]] = collections.deque()
        self._closed = False
        self._io = Connection(address, self._submits, self._cancels, self._window.release, broker_timeout, creds,
                              shared=self._shm is not None)
        self._wake = self._io.wake
        self._on_cancel, self._on_feed = self._io.cancel, self._io.feed  # bound once, not per task
        self._objects = _refs.Store(self._io.release, self._shm)  # scattered values (zpar._refs)
        self._io.start()
        if not self._io.welcomed.wait(connect_timeout) or self._io.failure is not None:
            failure = self._io.failure
            self.close()
            if isinstance(failure, AuthenticationError) and found is not None:
                raise AuthenticationError(
                    f"{failure}. This broker was found on the LAN ({found.describe()}) announcing the key our "
                    "credentials expect, yet it could not prove it holds that key: it may be an impostor repeating "
                    "a real broker's announcement (nothing was sent to it), or the broker's secret changed",
                ) from failure
            if failure is not None:
                raise failure
            hint = ("the embedded cluster did not start" if self._cluster else
                    "is `zpar-broker` running there, and is this its frontend address?")
            raise BrokerUnavailable(f"no zpar broker answered at {address} within {connect_timeout:g} s; {hint}")
        _live_clients.add(self)

    # ------------------------------------------------------------------ submit

    def _submit(self, fn: Callable[..., Any], payload: Any, flags: int, opts: TaskOptions,
                pickled: tuple[bytes, bytes] | None = None) -> Future:
        if self._closed:  # the stdlib's words, then ours
            raise RuntimeError("cannot schedule new futures after shutdown: this zpar Client is closed; "
                               "create a new one")
        digest, blob = pickled or self._funcs.get(fn, *identity(fn))
        def what() -> str:  # built only if something fails
            return f"arguments of {_name(fn)}"

        refs: tuple[bytes, ...] = ()
        deps: list[Future] = []
        noting = _refs.made  # note the Refs the arguments hold (zpar._refs): their digests go with the task
        waiting = _refs.futures_met  # ... and the pending Futures: the task waits for their values
        if noting:
            _refs.begin()
        if waiting:
            _refs.begin_deps()
        try:
            try:
                frames = serialize.dumps(payload, what, chunk=self._creds is not None, shared=self._shm)
            except SerializationError as exc:
                if waiting or not isinstance(exc.__cause__, _refs.Deferred):
                    raise
                waiting = True  # the first pending Future this process met: again, noting them
                if noting:
                    _refs.begin()
                _refs.begin_deps()
                frames = serialize.dumps(payload, what, chunk=self._creds is not None, shared=self._shm)
        finally:
            if noting:
                refs = _refs.taken()
            if waiting:
                deps = _refs.deps_taken()
        sched = self._dependencies(deps, opts.sched) if deps else opts.sched
        objects = self._objects.blobs(refs) if refs else None  # ValueError for another client's Ref
        if len(frames) > 1 or len(frames[0]) > P.INLINE_MAX:  # a small one fits
            serialize.check_payload(frames, what)
        if threading.get_ident() != self._io.ident:  # back-pressure; never block the I/O thread itself
            while not self._window.acquire(timeout=1.0):
                if not self._io.is_alive():
                    raise RuntimeError("this zpar Client's connection has stopped; create a new one")
        tid = next(self._ids)
        fut = Future(tid, self._on_cancel, self._on_feed)
        entry = P.TaskEntry(tid, digest, frames, flags, opts.retries, opts.timeout_ms, refs, sched=sched)
        name = self._names.get(digest)
        if name is None:
            if len(self._names) >= _NAMES:  # a new closure each call is a new digest: kept bounded
                self._names.clear()
            name = self._names[digest] = function_name(fn)
        task = PendingTask(entry, blob, opts, fut, objects, name, tuple(deps))
        self._submits.append(task)
        self._wake()
        if self._io.finished:  # the I/O thread ended (refused, or failed): nothing would send it
            self._io.abandon(task)
        return fut

    def _dependencies(self, deps: list[Future], sched: P.Sched | None) -> P.Sched:
        """The scheduling of a task whose arguments hold the pending Futures ``deps``: it waits for their tasks."""
        for dep in deps:
            if dep._on_cancel is not self._on_cancel:
                raise ValueError(f"the task's arguments hold a pending Future of another client ({dep!r}): pass "
                                 "Futures of the client that submits the task, or wait for the value first")
            if dep._stream is not None:
                raise ValueError(f"the task's arguments hold the Future of task {dep.task_id}, which streams or has a "
                                 "channel: pass its result() instead")
        if len(deps) > P.MAX_DEPS:
            raise ValueError(f"the task's arguments hold {len(deps)} pending Futures; at most {P.MAX_DEPS} fit: "
                             "gather them in steps (a tree of tasks), or wait for some first")
        return P.waiting_for(sched, tuple(dep.task_id for dep in deps))

    def scatter(self, obj: Any, /) -> _refs.Ref:
        """Put ``obj`` on the cluster once; returns a ``Ref`` to pass to any number of tasks instead of it.

        The value travels once to each node that runs a task using it (not
        once per task) and is kept there, unpickled once per worker: each task
        gets the value itself, read-only where it is a buffer (a NumPy array).
        A Ref may sit anywhere in a task's arguments: at the top, or inside
        lists, tuples, dicts, or any object they hold. The value is freed on
        the cluster once this process drops every Ref to it (or calls
        ``Ref.release()``), or the client closes, and no task using it is left.
        Raises SerializationError if ``obj`` does not pickle, PayloadTooLarge
        past the protocol's size. ``put`` is the same call (Ray's name).
        """
        return self._objects.put(obj)

    put = scatter

    def _abort(self, futures: Iterable[Future], exc: BaseException) -> None:
        """Fail ``futures`` with ``exc`` and stop their tasks (an Executor that broke)."""
        for fut in futures:
            try:
                fut.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                continue  # done meanwhile
            self._cancels.append((fut.task_id, True))
        self._wake()

    def cancel(self, futures: Iterable[concurrent.futures.Future[Any]], *, force: bool = False) -> int:
        """Cancel ``futures``; with ``force``, tasks already running are stopped too.

        A queued task never runs; a running one, when forced, has its worker
        stopped (and replaced). Returns how many futures were cancelled here.
        """
        return sum(fut.cancel(force=force) if isinstance(fut, Future) else fut.cancel() for fut in futures)

    @staticmethod
    def as_completed(futures: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None,
                     ) -> Iterator[concurrent.futures.Future[Any]]:
        """Yields the futures as they complete (``concurrent.futures.as_completed``)."""
        return concurrent.futures.as_completed(futures, timeout)

    @staticmethod
    def as_completed_async(futures: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None,
                           ) -> AsyncIterator[concurrent.futures.Future[Any]]:
        """``async for fut in client.as_completed_async(futures)``: each future once it is done."""
        from . import aio  # here: asyncio is 20 ms of imports that a client without it does without

        return aio.as_completed_async(futures, timeout)

    @staticmethod
    def gather(futures: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None) -> list[Any]:
        """The results of ``futures`` in order; raises the first task error met."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]

    # ------------------------------------------------------------------ lifetime

    def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> int:
        """Block until the cluster has at least ``n`` workers; returns how many it has.

        Raises TimeoutError naming what is missing if they do not come in time.
        """
        info = self._until(lambda info: info["workers"] >= n, timeout, lambda info: (
            f"the cluster at {self.address} has {info['workers']} workers, not {n}, after {timeout:g} s; are its "
            "agents running (zpar-agent --broker ...)?"))
        workers: int = info["workers"]
        return workers

    def _until(self, done: Callable[[dict[str, Any]], object], timeout: float,
               late: Callable[[dict[str, Any]], str], info: dict[str, Any] | None = None) -> dict[str, Any]:
        """The broker's status once ``done(status)`` holds (``info``: one already in hand, looked at first),
        polled soon, then less often (nothing wakes us sooner); TimeoutError with ``late(status)`` past
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            if info is None:
                info = self.status(max(0.1, deadline - time.monotonic()))
            if done(info):
                return info
            if time.monotonic() >= deadline:
                raise TimeoutError(late(info))
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
            info = None

    def scale(self, node: str, workers: int, *, wait: bool = True, timeout: float = 30.0) -> int:
        """Make the node named ``node`` keep ``workers`` workers from now on, live; returns its count.

        More workers start at once and take queued tasks; past ``workers``,
        idle workers stop now and busy ones once their task is done, so no
        task is lost. ``node`` is a name from ``status()["nodes"]``
        (``zpar-agent --name``, by default host:pid); the embedded cluster's
        one node is also called "local". With ``wait``, returns once the
        broker's status shows the node with ``workers`` (what its agent
        reports); without, at once, with the count the status shows now.

        Raises ConfigError for a count outside 1..MAX_WORKERS (to take a node
        out, drain it from the dashboard) or a node the broker does not know
        (the message names those it knows), AuthenticationError if the broker
        lets no client steer its nodes (key files, unless started with
        ``--allow-client-scale``), TimeoutError with the node's count if
        ``wait`` ran past ``timeout`` seconds, BrokerUnavailable if the broker
        does not answer.
        """
        if type(workers) is not int or not 1 <= workers <= P.MAX_WORKERS:
            raise ConfigError(f"workers must be a whole number from 1 to {P.MAX_WORKERS}, not {workers!r}; to take "
                              "a node out of the cluster, drain it from the broker's dashboard")
        deadline = time.monotonic() + timeout
        if node == "local" and self._cluster is not None:  # its one agent, named host:pid by the hub
            nodes = self._status(max(0.1, timeout))["nodes"]
            node = nodes[0]["name"] if len(nodes) == 1 else node
        info = self._status(max(0.1, deadline - time.monotonic()), {"scale": {"node": node, "workers": workers}})
        answer = info.get("scale")
        if not isinstance(answer, dict):
            raise ProtocolError(f"the broker at {self.address} did not answer the resize: is it older than this "
                                "client? (zpar-broker and zpar should be the same version)")
        if not answer.get("ok"):
            raise _scale_refused(answer, node, info, self.address)
        if wait:
            info = self._until(lambda info: _workers_of(info, node) == workers, deadline - time.monotonic(),
                               lambda info: (f"node {node!r} has {_workers_of(info, node)} workers, not {workers}, "
                                             f"{timeout:g} s after it was asked to resize (is its agent stuck, or "
                                             "gone?)"), info)
        return _workers_of(info, node)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    @property
    def embedded(self) -> bool:
        """True for the private cluster ``Client()`` started on this machine, False for a remote one."""
        return self._cluster is not None

    @property
    def window(self) -> int:
        """The most tasks in flight before ``submit`` blocks."""
        return self._window_size

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The broker's view: nodes, workers busy and idle, queued, running, done."""
        return self._status(timeout)

    def _status(self, timeout: float, request: dict[str, Any] | None = None) -> dict[str, Any]:
        return broker_status(self.address, timeout, self._creds, insecure=self._creds is None, request=request)

    @property
    def dashboard_link(self) -> str | None:
        """The link to the broker's dashboard page, with its token (open it in a browser); None if it serves
        none. The embedded cluster starts its dashboard when first asked (127.0.0.1, a free port): until then
        it listens on no TCP port at all. With key files, the address only: the token is in the broker's log."""
        link = self._status(5.0, {"dashboard": "start"}).get("dashboard")
        return str(link) if link else None

    def close(self) -> None:
        """Cancel what is pending, disconnect, and stop the embedded cluster if any."""
        if self._closed:
            return
        self._closed = True
        _live_clients.discard(self)
        self._objects.close()  # the broker frees them when we leave
        self._io.stop()
        if self._cluster is not None:
            self._cluster.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "embedded" if self._cluster else self.address
        return f"<zpar.Client {kind}{' closed' if self._closed else ''}>"


def _name(fn: Callable[..., Any]) -> str:
    return repr(getattr(fn, "__qualname__", fn))


def _workers_of(info: dict[str, Any], node: str) -> int:
    """The workers of the node named ``node`` in a broker's status (0: it is not there)."""
    return sum(int(n.get("workers", 0)) for n in info.get("nodes", ()) if n.get("name") == node)


def _scale_refused(answer: dict[str, Any], node: str, info: dict[str, Any], address: str) -> ZparError:
    """The error for a resize the broker refused (BrokerCore._scale's answer, as data)."""
    code, detail = answer.get("code"), str(answer.get("detail", ""))
    if code == P.ErrorCode.NOT_ALLOWED:
        return AuthenticationError(f"the broker at {address} refused to resize node {node!r}: {detail}")
    if code is not None:
        return ConfigError(f"the broker at {address} refused to resize node {node!r}: {detail}")
    names = sorted(str(n.get("name")) for n in info.get("nodes", ()))
    if answer.get("matches", 0):
        return ConfigError(f"{answer['matches']} nodes are named {node!r} at {address}: start their agents with "
                           "distinct --name to resize one")
    return ConfigError(f"no node named {node!r} at {address}; its nodes: {', '.join(map(repr, names)) or 'none'}")


_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for client in list(_live_clients):
        client.close()


def _credentials(secret: str | bytes | None, secret_file: str | None, key_file: str | None,
                 broker_key: str | None, insecure: bool = False,
                 address: str = "tcp://") -> security.Credentials | None:
    """The producer's credentials from the arguments, or else the ``ZPAR_*`` variables; "" is an error.

    With none of them: this user's own secret (security.client_credentials), unless ``insecure``.
    """
    where = "{name}="
    if secret is None and secret_file is None and key_file is None and broker_key is None:
        env = os.environ  # read when a client is made, never at import
        secret, secret_file = env.get("ZPAR_SECRET"), env.get("ZPAR_SECRET_FILE")
        key_file, broker_key = env.get("ZPAR_KEY_FILE"), env.get("ZPAR_BROKER_KEY")
        where = "ZPAR_{NAME}"
    text = secret.decode(errors="replace") if isinstance(secret, bytes) else secret
    for name, value in (("secret", text), ("secret_file", secret_file), ("key_file", key_file),
                        ("broker_key", broker_key)):
        if value is not None:  # set to nothing is an error, never a silent downgrade to plaintext
            config.check_not_empty(name, value, where.format(name=name, NAME=name.upper()))
    return security.client_credentials("producer", secret=secret, secret_file=secret_file, key_file=key_file,
                                       broker_key=broker_key, insecure=insecure, address=address)


def broker_status(address: str, timeout: float = 5.0, creds: security.Credentials | None = None, *,
                  insecure: bool = False, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ask the broker at ``address`` (its frontend) for its status (and what ``request`` asks besides:
    ``{"tasks": {"limit": n, "failed": bool}}`` for its task history).

    ``creds`` None: this user's own secret, or plaintext if ``insecure``.
    Raises BrokerUnavailable if it does not answer in ``timeout`` seconds, and
    AuthenticationError if it refuses the credentials (see security.client_credentials).
    """
    if creds is None:
        creds = security.client_credentials("producer", insecure=insecure, address=address)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.apply_client(sock, creds)
    monitor = security.HandshakeMonitor(sock, address, security.origin(creds)) if address.startswith("tcp://") else None
    try:
        sock.connect(address)
        sock.send_multipart(P.encode(P.StatusMsg(request or {})))
        deadline = time.monotonic() + timeout
        while not sock.poll(50):
            failure = monitor.check() if monitor else None
            if failure:
                raise AuthenticationError(failure)
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(f"no zpar broker answered at {address} within {timeout:g} s; "
                                        "is `zpar-broker` running, and is this its frontend address?")
        frames = sock.recv_multipart()
        msg = P.decode(frames)
        if not isinstance(msg, P.StatusMsg):
            raise ProtocolError(f"expected STATUS from the broker, got {msg.kind.name}")
        return msg.info
    finally:
        if monitor is not None:
            monitor.close()
        sock.close()
