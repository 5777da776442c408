"""A joblib parallel backend named ``"zpar"``: joblib, and scikit-learn's ``n_jobs``, on a zpar cluster.

Importing this module registers the backend (``register()`` does it again)::

    import joblib
    import zpar.joblib  # noqa: F401  (registers "zpar")

    with joblib.parallel_config(backend="zpar", n_jobs=-1):    # a private cluster, one worker per core
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

    with joblib.parallel_config(backend="zpar", address="tcp://host:5555"):
        GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)          # every candidate and fold on the cluster

Flow of one batch::

    joblib (main thread)  submit(BatchedCalls) ──▶ Client ──▶ broker ──▶ a worker runs _run_batch
    client's I/O thread   future done ──▶ queue
    callbacks thread      joblib's callback: record the outcome and duration (auto batch size),
                          take the next batch from the user's iterator, submit it

``n_jobs=-1`` means every worker of the cluster, ``-2`` all but one, and so on;
a positive ``n_jobs`` is capped at the cluster's worker count; ``n_jobs=1``
runs in this process, as with every joblib backend. A Parallel call made
inside a zpar task runs sequentially in that worker: a worker is one slot on
one core, and a task waiting for tasks of the same cluster could wait forever.

Large arrays go once per node, as loky memory-maps them once: a NumPy array
of ``max_nbytes`` or more (joblib's option, default 1 MB; None: never) among
a call's arguments (at the top, or in a list, tuple or dict there) is
scattered (``Client.scatter``) the first time a Parallel call meets it, and
every task of that call refers to it. Workers get it read-only, as loky's
memory-mapped arrays are. The Parallel call's end lets them go.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import joblib
from joblib._parallel_backends import (  # no public base for backends
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from ._refs import Ref
from .client import Client
from .errors import ConfigError

__all__ = ["ZparBackend", "register"]

log = logging.getLogger(__name__)

#: How long a call waits for a cluster with no worker to get one.
WORKERS_TIMEOUT = 30.0
#: How long a worker count read from the broker is trusted.
_STATUS_TTL = 1.0

#: A batch on the cluster: its result is the list of the batch's results.
_Batch = concurrent.futures.Future[list[Any]]
#: joblib's completion callback, given the batch's future.
_Callback = Callable[[_Batch], object]
#: joblib's default for ``max_nbytes``: arrays this large or larger go once per node.
MAX_NBYTES = 1 << 20


def register() -> None:
    """Register ``ZparBackend`` with joblib as ``"zpar"`` (done on import of ``zpar.joblib``)."""
    joblib.register_parallel_backend("zpar", ZparBackend)


def _run_batch(batch: Callable[[], list[Any]]) -> list[Any]:
    """The task every batch runs as (one function, shipped once, whatever the batch holds)."""
    return batch()


def _discard(pending: set[_Batch], lock: threading.Lock, future: _Batch) -> None:
    with lock:
        pending.discard(future)


def _in_zpar_worker() -> bool:
    """True in a zpar worker process (``python -m zpar.agent.worker``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "zpar.agent.worker"


def _run_callbacks(jobs: queue.SimpleQueue[tuple[_Callback, _Batch] | None]) -> None:
    while (job := jobs.get()) is not None:
        callback, future = job
        try:
            callback(future)
        except Exception:  # joblib's callbacks record failures themselves; this is a bug somewhere
            log.exception("joblib's completion callback for zpar task %s raised",
                          getattr(future, "task_id", "(not submitted)"))


class _Completions:
    """Runs joblib's completion callbacks on a thread of their own.

    A callback takes the next tasks from the user's iterator, pickles and
    submits them. On the client's I/O thread that would hold up every other
    result, and could deadlock: joblib's main thread holds its lock while
    ``submit`` waits for window space that only the I/O thread frees.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[_Callback, _Batch] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=_run_callbacks, args=(self._jobs,), name="zpar-joblib-callbacks",
                                        daemon=True)  # holds no reference to the backend, so it can be collected
        self._thread.start()

    def watch(self, future: _Batch, callback: _Callback) -> None:
        jobs = self._jobs
        future.add_done_callback(lambda f: jobs.put((callback, f)))

    def stop(self) -> None:
        """Run the callbacks already queued, then end the thread."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(10.0)


class ZparBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's tasks, batched, on a zpar cluster.

    ``address``: a broker's frontend (``tcp://host:5555``); None starts a
    private cluster on this machine (``workers`` workers, default one per
    core) the first time it is needed, which stops when this backend is
    closed or collected, or at exit. ``secret`` is passed on to
    ``zpar.Client`` when given. ``client``: an open ``zpar.Client`` to use
    instead; it is not closed here.

    Auto batching is joblib's own: each batch's time from dispatch to result
    sets the size of the next. ``abort_everything`` (a task raised, or
    Parallel's ``timeout`` passed) cancels every pending task, stopping those
    already running. Raises ConfigError for contradictory arguments, and
    TimeoutError when the cluster has no worker after ``WORKERS_TIMEOUT``.
    """

    supports_retrieve_callback = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = 1

    def __init__(self, address: str | None = None, *, secret: str | bytes | None = None, client: Client | None = None,
                 workers: int | None = None, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None) -> None:
        # Our own arguments are taken here: joblib < 1.5 passes any others on to object().
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if client is not None and (address is not None or secret is not None or workers is not None):
            raise ConfigError("give the zpar backend either client= or address=/secret=/workers=, not both")
        self._address, self._secret, self._workers = address, secret, workers
        self._client = client
        self._client_lock = threading.Lock()
        self._worker_count, self._counted_at = 0, -_STATUS_TTL
        self._pending: set[_Batch] = set()  # submitted and not done, for abort_everything
        self._pending_lock = threading.Lock()
        self._completions: _Completions | None = None
        self._parallel_ref: weakref.ref[joblib.Parallel] | None = None
        self._closer: weakref.finalize[[], ZparBackend] | None = None
        self._max_nbytes: int | None = MAX_NBYTES
        self._scattered = _Scattered()

    # joblib sets and reads ``backend.parallel``. Held weakly: a Parallel holds
    # its backend, and the cycle would keep an embedded cluster alive until the
    # garbage collector ran, rather than until the backend is dropped.
    # (joblib's own configure() stores None here; joblib-stubs declare it never None.)
    @property  # type: ignore[override]
    def parallel(self) -> joblib.Parallel | None:
        return None if self._parallel_ref is None else self._parallel_ref()

    @parallel.setter
    def parallel(self, parallel: joblib.Parallel | None) -> None:
        self._parallel_ref = None if parallel is None else weakref.ref(parallel)

    # ------------------------------------------------------------------ the cluster

    @property
    def client(self) -> Client:
        """The zpar Client this backend submits through (connecting or starting a cluster on first use)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Client:
        client = Client(self._address, secret=self._secret, workers=self._workers)
        self._closer = weakref.finalize(self, client.close)
        log.debug("zpar joblib backend: connected to %s", client.address)
        return client

    def close(self) -> None:
        """Close the Client this backend started, stopping its private cluster if it has one."""
        self.terminate()
        if self._closer is not None:
            self._closer()
            self._closer, self._client = None, None

    def _worker_total(self) -> int:
        now = time.monotonic()
        if now - self._counted_at >= _STATUS_TTL:
            client = self.client
            workers = client.status()["workers"]
            if workers == 0:
                workers = client.wait_for_workers(1, WORKERS_TIMEOUT)
            self._worker_count, self._counted_at = workers, time.monotonic()
        return self._worker_count

    # ------------------------------------------------------------------ joblib's contract

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many batches can run at once: ``n_jobs`` counted against the cluster's workers."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs == 1:
            return 1
        if _in_zpar_worker():
            warnings.warn("a joblib Parallel call inside a zpar task runs sequentially in its worker; "
                          "n_jobs set to 1", stacklevel=3)
            return 1
        workers = self._worker_total()
        return max(workers + 1 + n_jobs, 1) if n_jobs < 0 else min(n_jobs, workers)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **memmapping_args: Any) -> int:
        """Ready the backend for one Parallel call; returns the effective n_jobs.

        ``n_jobs=1`` (and any call inside a zpar worker) falls back to
        joblib's sequential backend. Of loky's memory-mapping options,
        ``max_nbytes`` is kept: arrays that large go once per node (see the
        module docstring); the others are ignored.
        """
        if n_jobs is None or n_jobs == 1 or _in_zpar_worker():
            self.effective_n_jobs(n_jobs)  # the warning, inside a worker
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        max_nbytes = memmapping_args.get("max_nbytes", MAX_NBYTES)
        self._max_nbytes = joblib.parallel.memstr_to_bytes(max_nbytes) if isinstance(max_nbytes, str) else max_nbytes
        self.parallel = parallel
        self._counted_at = -_STATUS_TTL  # a fresh worker count for each call
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Callable[[], Any], callback: _Callback | None = None) -> _Batch:
        """Run a batch on the cluster; ``callback(future)`` runs on the callbacks thread once it is done.

        A batch that cannot be submitted (it does not pickle, say) comes back
        as a failed future, so joblib raises its error in the caller's thread.
        """
        try:
            if self._max_nbytes is not None:
                func = self._scattered.swap(func, self._max_nbytes, self.client)
            future: _Batch = self.client.submit(_run_batch, func)
        except Exception as exc:  # noqa: BLE001  (any error: joblib raises it in the caller's thread)
            future = concurrent.futures.Future()
            future.set_exception(exc)
        else:
            pending, lock = self._pending, self._pending_lock
            with lock:
                pending.add(future)
            # Not a bound method: the client's futures must not keep this backend (and its cluster) alive.
            future.add_done_callback(lambda f: _discard(pending, lock, f))
        if callback is not None:
            if self._completions is None:
                self._completions = _Completions()
            self._completions.watch(future, callback)
        return future

    def apply_async(self, func: Callable[[], Any], callback: _Callback | None = None) -> _Batch:
        """joblib < 1.5 calls this; joblib >= 1.5 calls ``submit``."""
        return self.submit(func, callback)

    # joblib hands back what our submit() returned; the stubs' base also takes a pool's AsyncResult.
    def retrieve_result_callback(self, out: _Batch) -> list[Any]:  # type: ignore[override]
        """The batch's results, or its task's exception raised as itself."""
        return out.result()

    def retrieve_result(self, out: _Batch, timeout: float | None = None) -> list[Any]:  # type: ignore[override]
        return out.result(timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel every pending batch of this backend; those already running have their workers stopped."""
        with self._pending_lock:
            pending = list(self._pending)
            self._pending.clear()
        if pending:
            cancelled = self.client.cancel(pending, force=True)
            log.debug("zpar joblib backend: aborted, %d of %d pending batches cancelled", cancelled, len(pending))
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        """End of a Parallel call: stop the callbacks thread, forget the batch statistics."""
        if self._completions is not None:
            self._completions.stop()
            self._completions = None
        self._scattered.clear()  # the call's large arrays: freed on the cluster once no task uses them
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[SequentialBackend, int | None]:
        """Parallel calls inside a task run sequentially in its worker."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    def __repr__(self) -> str:
        where = self._client if self._client is not None else (self._address or "embedded, not started")
        return f"<ZparBackend {where!r}>"


class _Scattered:
    """The large arrays of one Parallel call, each scattered once: its calls refer to them by Ref."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id(array) -> (array, its Ref); the array is held so that its id names it until the call ends
        self._refs: dict[int, tuple[Any, Ref]] = {}

    def swap(self, batch: Callable[[], Any], max_nbytes: int, client: Client) -> Callable[[], Any]:
        """``batch`` (joblib's BatchedCalls) with its large arrays replaced by Refs; itself if it has none."""
        items = getattr(batch, "items", None)
        if type(items) is not list:
            return batch
        swapped, changed = [], False
        for item in items:
            fn, args, kwargs = item
            new_args = tuple(self._value(a, max_nbytes, client) for a in args)
            new_kwargs = {k: self._value(v, max_nbytes, client) for k, v in kwargs.items()}
            if any(a is not b for a, b in zip(new_args, args, strict=True)) or any(
                    new_kwargs[k] is not v for k, v in kwargs.items()):
                changed = True
                item = (fn, new_args, new_kwargs)
            swapped.append(item)
        if not changed:
            return batch
        clone = copy.copy(batch)  # joblib keeps its own batch as it was
        clone.items = swapped  # type: ignore[attr-defined]
        return clone

    def _value(self, value: Any, max_nbytes: int, client: Client, depth: int = 1) -> Any:
        if _large_array(value, max_nbytes):
            with self._lock:
                hit = self._refs.get(id(value))
                if hit is None or hit[0] is not value:
                    hit = self._refs[id(value)] = (value, client.scatter(value))
            return hit[1]
        if depth and type(value) in (list, tuple):
            new = [self._value(v, max_nbytes, client, depth - 1) for v in value]
            if any(a is not b for a, b in zip(new, value, strict=True)):
                return type(value)(new)
        elif depth and type(value) is dict:
            new_d = {k: self._value(v, max_nbytes, client, depth - 1) for k, v in value.items()}
            if any(new_d[k] is not v for k, v in value.items()):
                return new_d
        return value

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()


def _large_array(value: Any, max_nbytes: int) -> bool:
    """A NumPy array (or subclass, such as a memmap) of ``max_nbytes`` or more; numpy is not imported here."""
    module = type(value).__module__
    return (module == "numpy" or module.startswith("numpy.")) and hasattr(value, "__array_interface__") and \
        getattr(value, "nbytes", 0) >= max_nbytes


register()
