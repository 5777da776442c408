"""``zpar.Pool``: ``multiprocessing.Pool``'s API on a zpar cluster.

A thin layer over ``Client``. ``map`` cuts its input into chunks the way
multiprocessing does, each chunk one task; ``map_async`` and ``apply_async``
return AsyncResults over the tasks' futures (fed by their done-callbacks when
there are callbacks to run); ``imap`` and ``imap_unordered`` read their input
a window ahead of the results.

State, as multiprocessing's::

    RUN ──close()──▶ CLOSE ──join()──▶ (client closed)
     └────────terminate() (from any state): tasks cancelled, running ones stopped
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, Self

from ._maps import MapOptions, Results, plan, submit_all
from ._wrappers import Outstanding, Wrappers, client_options
from .client import Client
from .config import usable_cores
from .errors import ConfigError, ResultTimeout
from .futures import Future

#: ``from zpar.pool import Pool, TimeoutError`` for ``from multiprocessing import Pool, TimeoutError``:
#: ``get(timeout)`` raises ResultTimeout, a subclass of it.
TimeoutError = multiprocessing.TimeoutError  # noqa: A001 - the name multiprocessing programs import

log = logging.getLogger(__name__)


class _State(enum.Enum):
    RUN = "RUN"
    CLOSE = "CLOSE"
    TERMINATE = "TERMINATE"


class Pool:
    """``multiprocessing.Pool`` on a zpar cluster: change the import, keep the code.

    ``Pool(processes)`` starts a private cluster on this machine with
    ``processes`` workers (default: one per core) and stops it on ``join`` or
    ``terminate``. ``Pool(address="tcp://host:5555", secret=...)`` uses a
    running cluster, whose agents set its size: ``processes`` then only sizes
    ``map``'s default chunks (default: the workers the cluster has now).
    Other keywords go to ``zpar.Client``.

    ``initializer(*initargs)`` runs once in each worker process before it runs
    this pool's first task there; workers of a cluster are shared, so it runs
    lazily, with that first task (if it raises, that task fails with its
    exception and the next one tries again). Functions of the script being run
    travel by value, each with its own copy of the script's globals: an
    initializer defined there runs once per worker for each function the pool
    ships, so that every task sees the globals it set.

    ``maxtasksperchild`` replaces a worker after that many tasks (a chunk
    counts as one, as in multiprocessing) on the private cluster; on a remote
    one it is the agents' setting (``zpar-agent --max-tasks-per-worker``) and
    is ignored here with a warning. ``context`` is accepted and ignored:
    workers are always fresh interpreters, like multiprocessing's "spawn".

    Callbacks run on the client's I/O thread (multiprocessing runs them on its
    result-handler thread): they should return quickly; an exception in one is
    logged. ``apply_async`` and the maps block only while the client's window
    (10,000 tasks in flight by default) is full.
    """

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None, context: Any = None, *,
                 address: str | None = None, secret: Any = None, **client_kwargs: Any) -> None:
        if processes is not None and processes < 1:
            raise ConfigError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ConfigError("maxtasksperchild must be a positive int or None")
        self._calls = Wrappers(initializer, initargs)  # before the Client: a bad initializer starts nothing
        kwargs = client_options(address, processes, maxtasksperchild, "maxtasksperchild", client_kwargs)
        self._client = Client(address, secret=secret, **kwargs)
        try:
            self._processes = processes or (usable_cores() if address is None else
                                            max(1, self._client.status()["workers"]))
        except BaseException:
            self._client.close()
            raise
        self._tasks = Outstanding(self._client, lambda: ValueError("Pool not running"))
        self._submit: Callable[..., Future] = self._tasks.submit  # with the client's TaskOptions (see ``options``)
        self._state = _State.RUN

    @property
    def client(self) -> Client:
        """The Client this pool submits through."""
        return self._client

    def options(self, **changes: Any) -> PoolOptions:
        """This pool, submitting with other TaskOptions (``Client.options``: ``priority``, ``resources``,
        ``resource_timeout``, ``timeout``, ``retries``, ``retry_on``); its ``apply``, ``map``, ``imap`` and the
        rest as here::

            pool.options(priority=10).map(urgent, items)
            pool.options(resources={"gpu": 1}).apply_async(train, (model,))

        Its tasks are this pool's: ``join`` waits for them; once the pool is closed it refuses them.
        """
        return PoolOptions(self, self._client.options(**changes).submit)

    # ------------------------------------------------------------------ blocking

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: Mapping[str, Any] | None = None) -> Any:
        """``func(*args, **kwds)`` on a worker; its result, or its exception raised here."""
        return self.apply_async(func, args, kwds).get()

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None) -> list[Any]:
        """``[func(x) for x in iterable]``, run in chunks on the workers."""
        values: list[Any] = self._map_async(func, iterable, False, chunksize, None, None).get()
        return values

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[Any]:
        """``[func(*args) for args in iterable]``, run in chunks on the workers."""
        values: list[Any] = self._map_async(func, iterable, True, chunksize, None, None).get()
        return values

    # ------------------------------------------------------------------ asynchronous

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: Mapping[str, Any] | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None) -> AsyncResult:
        """Start ``func(*args, **kwds)``; an AsyncResult for it."""
        self._check_running()
        fut = self._submit(self._calls.call(func), *args, **(kwds or {}))
        return _result([fut], False, callback, error_callback)

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None) -> AsyncResult:
        """Start ``map``; an AsyncResult whose value is the list of results."""
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None) -> AsyncResult:
        """Start ``starmap``; an AsyncResult whose value is the list of results."""
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], star: bool, chunksize: int | None,
                   callback: Callable[[Any], Any] | None,
                   error_callback: Callable[[BaseException], Any] | None) -> AsyncResult:
        self._check_running()
        items = iterable if isinstance(iterable, Sized) else list(iterable)  # a list only if it has no len()
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize}")
        # Always chunks, even of one item, as multiprocessing's mapstar: AsyncResult flattens them.
        work = plan(func, items, star=star, chunksize=max(1, chunksize), wrappers=self._calls)
        return _result(submit_all(self._submit, work), True, callback, error_callback)

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        """``func`` over ``iterable``, results in order as they come; ``next(timeout)`` as multiprocessing's."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> IMapIterator:
        """Like ``imap``, in the order results come in."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int,
              ordered: bool) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        work = plan(func, iterable, star=False, chunksize=chunksize if chunksize > 1 else None, wrappers=self._calls)
        # multiprocessing's contract: next() goes on past an error or a timeout; tasks are not cancelled.
        options = MapOptions(ordered=ordered, window=self._client.window, timeout_error=ResultTimeout,
                             errors_end=False, cancel_on_exit=False)
        return IMapIterator(Results(self._submit, work, options))

    # ------------------------------------------------------------------ lifetime

    def _check_running(self) -> None:
        if self._state is not _State.RUN:
            raise ValueError("Pool not running")

    def close(self) -> None:
        """Accept no more work; what was submitted runs to the end."""
        if self._state is _State.RUN:
            self._state = _State.CLOSE

    def join(self) -> None:
        """Wait for every task, then close the client (and stop the private cluster); after close().

        ``imap`` iterators read their input a window (10,000 chunks) ahead of
        the results: consume one longer than that before join().
        """
        if self._state is _State.RUN:
            raise ValueError("Pool is still running")
        self._tasks.drain()
        self._tasks.close()
        self._client.close()

    def terminate(self) -> None:
        """Cancel every task, stop those running (their workers are replaced), close the client."""
        self._state = _State.TERMINATE
        self._tasks.close()
        self._tasks.cancel(force=True)
        self._client.close()  # its goodbye also makes the broker stop whatever it still runs for us

    def __enter__(self) -> Self:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<zpar.Pool state={self._state.value} pool_size={self._processes} on {self._client!r}>"


class PoolOptions:
    """``Pool.options(...)``: the pool's ways to submit, with other TaskOptions; its state is the pool's."""

    apply, map, starmap = Pool.apply, Pool.map, Pool.starmap
    apply_async, map_async, starmap_async, _map_async = Pool.apply_async, Pool.map_async, Pool.starmap_async, \
        Pool._map_async
    imap, imap_unordered, _imap = Pool.imap, Pool.imap_unordered, Pool._imap

    def __init__(self, pool: Pool, submit: Callable[..., Future]) -> None:
        self._pool = pool
        self._submit = functools.partial(pool._tasks.submit_via, submit)

    def __getattr__(self, name: str) -> Any:  # the pool's state, read when used: closing the pool closes this
        return getattr(self._pool, name)

    def __repr__(self) -> str:
        return f"<options of {self._pool!r}>"


class AsyncResult:
    """The result of ``apply_async`` or ``map_async``, as multiprocessing's ``AsyncResult``.

    Ready once every task behind it is done. ``get`` raises a task's
    exception (the first in input order) only then, as multiprocessing does.
    Without callbacks nothing runs on the client's I/O thread for it: the
    caller's thread collects the results.
    """

    def __init__(self, futures: list[concurrent.futures.Future[Any]], chunked: bool) -> None:
        self._futures, self._chunked = futures, chunked

    def _wait_all(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for fut in self._futures:
            if fut.done():
                continue
            try:
                fut.exception(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except concurrent.futures.CancelledError:
                pass
            except concurrent.futures.TimeoutError:  # not the task's: exception() returns that one
                return False
        return True

    def ready(self) -> bool:
        """Whether every task is done."""
        return all(fut.done() for fut in self._futures)

    def successful(self) -> bool:
        """Whether it is done without an exception; ValueError if it is not ready yet."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return not any(fut.cancelled() or fut.exception() is not None for fut in self._futures)

    def wait(self, timeout: float | None = None) -> None:
        """Block until ready, or for ``timeout`` seconds."""
        self._wait_all(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The value; the task's exception raised here; ResultTimeout (a multiprocessing.TimeoutError) if not
        ready within ``timeout``."""
        if not self._wait_all(timeout):
            raise ResultTimeout(f"the result was not in within {timeout:g} s")
        if not self._chunked:
            return self._futures[0].result()
        values: list[Any] = []
        for fut in self._futures:
            values.extend(fut.result())
        return values

    def __repr__(self) -> str:
        state = "pending" if not self.ready() else "done" if self.successful() else "failed"
        return f"<zpar.pool.AsyncResult {state}>"


class _CallbackResult(AsyncResult):
    """An AsyncResult with ``callback(value)`` or ``error_callback(first exception)``, run once.

    Fed by its futures' done-callbacks; ready only once the callback has run,
    as in multiprocessing, where ``get()`` returns after it.
    """

    def __init__(self, futures: list[concurrent.futures.Future[Any]], chunked: bool,
                 callback: Callable[[Any], Any] | None, error_callback: Callable[[BaseException], Any] | None) -> None:
        super().__init__([], chunked)
        self._callback, self._error_callback = callback, error_callback
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._parts: list[Any] = [None] * len(futures)
        self._left = len(futures)
        self._error: BaseException | None = None
        self._value: Any = None
        if not futures:
            self._finish()
        for i, fut in enumerate(futures):
            fut.add_done_callback(functools.partial(self._done, i))

    def _done(self, i: int, fut: concurrent.futures.Future[Any]) -> None:
        try:
            exc = fut.exception()
        except concurrent.futures.CancelledError as cancelled:
            exc = cancelled
        with self._lock:
            if exc is None:
                self._parts[i] = fut.result()
            elif self._error is None:
                self._error = exc  # the first to fail, as multiprocessing keeps
            self._left -= 1
            last = not self._left
        if last:
            self._finish()

    def _finish(self) -> None:
        if self._error is None:
            self._value = list(itertools.chain.from_iterable(self._parts)) if self._chunked else self._parts[0]
        self._parts = []
        try:
            if self._error is None and self._callback is not None:
                self._callback(self._value)
            elif self._error is not None and self._error_callback is not None:
                self._error_callback(self._error)
        except Exception:
            log.exception("a Pool callback raised; ignored")
        finally:
            self._event.set()  # after the callback, as in multiprocessing: get() returns once it ran

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        if not self._event.wait(timeout):
            raise ResultTimeout(f"the result was not in within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._value


def _result(futures: list[concurrent.futures.Future[Any]], chunked: bool, callback: Callable[[Any], Any] | None,
            error_callback: Callable[[BaseException], Any] | None) -> AsyncResult:
    if callback is None and error_callback is None:
        return AsyncResult(futures, chunked)
    return _CallbackResult(futures, chunked, callback, error_callback)


class IMapIterator:
    """The iterator of ``imap`` and ``imap_unordered``: ``next(timeout)`` as multiprocessing's.

    Keeps up to the client's window of tasks in flight, submitting more as
    results come in. A task's exception is raised by ``next`` in its place,
    and a timeout raises ResultTimeout; iteration can go on past either.
    Several threads may read it.
    """

    def __init__(self, results: Results) -> None:
        self._results = results
        self._ready = results.ready
        self._lock = threading.Lock()

    def __iter__(self) -> IMapIterator:
        return self

    def __next__(self) -> Any:
        if self._ready:  # the fast path, without the lock: the rest of a chunk already in
            try:
                return self._ready.popleft()
            except IndexError:  # another thread took it
                pass
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; ResultTimeout (a multiprocessing.TimeoutError) if none within ``timeout``."""
        with self._lock:
            return self._results.next(timeout)
