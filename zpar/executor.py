"""``zpar.Executor``: a ``concurrent.futures.Executor`` running on a zpar cluster.

A thin layer over ``Client``: ``submit`` is ``Client.submit`` (the futures are
zpar Futures, themselves ``concurrent.futures.Future`` objects), ``map`` sends
chunks as single tasks the way ``ProcessPoolExecutor`` does, and ``shutdown``
waits for what was submitted before it closes the client.

As the stdlib's executors, one never shut down still runs what was submitted
when the interpreter exits: a hook the stdlib's own use (``threading``'s, run
when the main thread ends, before ``atexit``, which closes the clients) waits
for it, and refuses new submits from then on.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._maps import MapOptions, Results, over
from ._wrappers import Outstanding, Wrappers, client_options
from .client import Client
from .errors import BrokenCluster, BrokerUnavailable, ConfigError, InitializerError
from .futures import Future

log = logging.getLogger(__name__)

#: The work of every Executor not shut down, for the exit hook; strong references, as the
#: stdlib keeps its executors' threads: work submitted to an executor since dropped still runs.
_live: set[Outstanding] = set()
_live_lock = threading.Lock()


@functools.cache
def _exit_hook() -> bool:
    """Install the exit hook, once: with the first Executor, not at import. False if too late for it."""
    try:
        threading._register_atexit(_wait_at_exit)  # type: ignore[attr-defined]
    except RuntimeError:  # the interpreter is shutting down already: nothing will wait
        return False
    return True


def _track(tasks: Outstanding) -> None:
    """Wait for ``tasks`` at exit."""
    with _live_lock:
        if _exit_hook():
            _live.add(tasks)


def _wait_at_exit() -> None:
    """The interpreter is exiting: refuse new work and let what was submitted finish, as the stdlib does
    (its executors shut down then: a done-callback's submit hears "cannot schedule new futures after shutdown")."""
    with _live_lock:
        live = list(_live)
    for tasks in live:
        tasks.close()
    for tasks in live:
        tasks.drain()


class Executor(concurrent.futures.Executor):
    """``ProcessPoolExecutor`` on a zpar cluster: change the class name, keep the code.

    ``Executor()`` starts a private cluster on this machine with
    ``max_workers`` workers (default: one per core) and stops it on
    ``shutdown``. ``Executor(address="tcp://host:5555")`` uses a running
    cluster; its size is set by its agents, so ``max_workers`` is not used
    there (pass ``window=N`` to bound how many of this executor's tasks are in
    flight). ``secret`` and any other keyword (``window``, ``timeout``,
    ``retries``, ``connect_timeout``, ``broker_timeout``) go to ``zpar.Client``.

    ``initializer(*initargs)`` runs once in each worker process before it runs
    this executor's first task there (one defined in the script being run,
    shipped by value, runs once per worker for each function submitted, so
    that each sees the globals it set). If it raises, the executor is broken,
    as the stdlib's: that task, every pending one and each later ``submit``
    fail with InitializerError (a ``BrokenProcessPool``) caused by its error.
    ``max_tasks_per_child`` replaces a worker after that many tasks on the
    private cluster; on a remote one it is the agents' setting
    (``zpar-agent --max-tasks-per-worker``) and is ignored here with a warning.

    Raises BrokenCluster (a ``concurrent.futures.BrokenExecutor`` and a
    BrokerUnavailable) if no broker answers; pending futures fail with it if
    the broker goes away for longer than ``broker_timeout``.
    """

    def __init__(self, max_workers: int | None = None, address: str | None = None, *, secret: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = (),
                 max_tasks_per_child: int | None = None, **client_kwargs: Any) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ConfigError(f"max_workers must be greater than 0, not {max_workers}")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ConfigError(f"max_tasks_per_child must be at least 1, not {max_tasks_per_child}")
        self._calls = Wrappers(initializer, initargs, breaks=True)  # before the Client: a bad one starts nothing
        kwargs = client_options(address, max_workers, max_tasks_per_child, "max_tasks_per_child", client_kwargs)
        if address is not None and max_workers is not None:
            log.debug("max_workers=%d not used: the agents of %s set the cluster's size", max_workers, address)
        try:
            self._client = Client(address, secret=secret, **kwargs)
        except BrokerUnavailable as exc:
            if isinstance(exc, BrokenCluster):
                raise
            raise BrokenCluster(str(exc)) from exc
        self._tasks = Outstanding(self._client, lambda: RuntimeError("cannot schedule new futures after shutdown"),
                                  breaks_on=InitializerError)
        self._closer: threading.Thread | None = None
        self._submit = self._tasks.submit  # through the client's default TaskOptions (see ``options``)
        _track(self._tasks)

    @property
    def client(self) -> Client:
        """The Client this executor submits through (for ``status()``, ``wait_for_workers()``)."""
        return self._client

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; returns its Future.

        Raises RuntimeError after ``shutdown``, InitializerError (a
        ``BrokenProcessPool``) once the initializer failed, SerializationError
        (a TypeError and a ``pickle.PicklingError``) if the function or an
        argument does not pickle. Blocks while the client's window of tasks in
        flight is full.
        """
        return self._submit(self._calls.call(fn), *args, **kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """``fn`` over the zipped iterables, results in order, as ``Executor.map``.

        Every task is submitted now (``chunksize`` items to a task); the
        iterator raises TimeoutError if a result is not in ``timeout`` seconds
        after this call, and the task's exception where one raised. Leaving
        it early cancels the tasks not yet done.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        # Eager, as the stdlib's: every task is in before map returns, and shutdown waits for them all.
        return Results(self._submit, over(fn, iterables, chunksize, self._calls), MapOptions(timeout=timeout))

    def options(self, **changes: Any) -> ExecutorOptions:
        """This executor, submitting with other TaskOptions (``Client.options``: ``priority``, ``resources``,
        ``resource_timeout``, ``timeout``, ``retries``, ``retry_on``); ``submit`` and ``map`` as here::

            ex.options(priority=10).submit(urgent, x)
            ex.options(resources={"gpu": 1}).map(train, models)

        Its tasks are this executor's: ``shutdown`` waits for them, and refuses them after it.
        """
        return ExecutorOptions(self, self._client.options(**changes).submit)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more tasks; close the client (and stop the private cluster) once every task is done.

        ``wait``: return after that, else at once (the closing happens in a
        thread, and the interpreter waits for it at exit, as for the stdlib's
        executors). ``cancel_futures``: cancel every future not yet done;
        unlike a process pool, zpar cannot tell a queued task from a running
        one, so running tasks are cancelled too (and stopped as the client closes).
        """
        self._tasks.close()
        with _live_lock:
            _live.discard(self._tasks)  # from now on, shutdown's own wait (or its thread) is the one
        if cancel_futures:
            self._tasks.cancel()
        if wait:
            self._close()
        elif self._closer is None:
            self._closer = threading.Thread(target=self._close, name="zpar-executor-shutdown")
            self._closer.start()

    def _close(self) -> None:
        self._tasks.drain()
        self._client.close()

    def __repr__(self) -> str:
        state = ("broken" if self._tasks.broken else "shut down" if self._tasks.closed
                 else f"{len(self._tasks.futures)} pending")
        return f"<zpar.Executor on {self._client!r}, {state}>"


class ExecutorOptions:
    """``Executor.options(...)``: the executor's ``submit`` and ``map``, with other TaskOptions."""

    submit = Executor.submit
    map = Executor.map

    def __init__(self, executor: Executor, submit: Callable[..., Future]) -> None:
        self._executor = executor
        self._calls = executor._calls
        self._submit = functools.partial(executor._tasks.submit_via, submit)

    def __repr__(self) -> str:
        return f"<options of {self._executor!r}>"

