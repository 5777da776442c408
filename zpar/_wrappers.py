"""What ``Executor`` and ``Pool`` share: the callables they ship, their outstanding futures, their Client's options.

Both are thin layers over a Client. They send workers two kinds of callable
besides the user's function itself:

- ``Call``: the function, after its pool's initializer;
- ``Chunk``: many calls of the function as one task, ``list(map(fn, items))``
  or ``list(starmap(fn, items))``, as multiprocessing's ``mapstar`` does.
  Every map chunks this way, ``Client.map`` too (``_maps.plan``).

Workers are shared: on a cluster one worker process runs the tasks of many
pools, one after another. A pool's initializer must run once in each worker
before that worker runs the pool's first task, so each wrapper carries its
pool's token and every worker process remembers, in ``_initialised``, the
tokens whose initializer already ran there. A recycled worker is a new
process, with an empty set, as a new multiprocessing child would be.

One exception to "once": functions cloudpickle ships by value (those of the
script being run, ``__main__``) arrive with their own copy of the module's
globals, one copy per wrapper, and an initializer mostly exists to set
globals. So "ran" is remembered per copy of the initializer's globals: an
initializer of an importable module runs once per process; one defined in
the script runs once per process for each function the pool ships, and every
task sees what it set, as it would under multiprocessing.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from . import errors  # its InitializerError loads when first used (zpar.errors says why)
from . import protocol as P

if TYPE_CHECKING:
    from .futures import Future

#: In a worker process: (pool token, id of the initializer's globals) of the initializers that ran in it.
#: Module state on purpose: it is what "once per process" means. The globals stay alive (the
#: worker caches every function it loads), so their ids are not reused.
_initialised: set[tuple[str, int]] = set()


_W = TypeVar("_W", bound=Callable[..., Any])


class Initializer:
    """``fn(*args)``, run at most once per worker process for one pool (``token``).

    ``breaks``: an Executor's, whose failure breaks it, as the stdlib's:
    ``ensure`` raises InitializerError (a BrokenProcessPool) from it.
    """

    __slots__ = ("args", "breaks", "fn", "token")

    def __init__(self, fn: Callable[..., Any], args: Iterable[Any] = (), breaks: bool = False) -> None:
        if not callable(fn):
            raise TypeError("initializer must be a callable")
        self.token = uuid.uuid4().hex
        self.fn = fn
        self.args = tuple(args)
        self.breaks = breaks

    def ensure(self) -> None:
        """Run the initializer here unless it already ran in this process.

        If it raises, the task that called it fails with that exception (or,
        when it ``breaks``, with InitializerError from it) and the next task of
        the pool on this worker tries it again.
        """
        key = (self.token, id(getattr(self.fn, "__globals__", None)))
        if key in _initialised:
            return
        try:
            self.fn(*self.args)
        except BaseException as exc:
            if not self.breaks:
                raise
            name = getattr(self.fn, "__qualname__", repr(self.fn))
            raise errors.InitializerError(f"the initializer {name} raised {type(exc).__name__}: {exc}; the Executor is "
                                   "broken: fix the initializer and make a new Executor") from exc
        _initialised.add(key)


class Call:
    """``fn(*args, **kwargs)`` in a worker, after the pool's initializer."""

    __slots__ = ("__weakref__", "fn", "init")

    def __init__(self, fn: Callable[..., Any], init: Initializer) -> None:
        self.fn, self.init = fn, init

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.init.ensure()
        return self.fn(*args, **kwargs)


class Chunk:
    """A chunk of calls as one task: ``fn(x)`` for each item, or ``fn(*x)`` when ``star``."""

    __slots__ = ("__weakref__", "fn", "init", "star")

    def __init__(self, fn: Callable[..., Any], star: bool, init: Initializer | None) -> None:
        self.fn, self.star, self.init = fn, star, init

    def __call__(self, items: list[Any]) -> list[Any]:
        if self.init is not None:
            self.init.ensure()
        return list(itertools.starmap(self.fn, items) if self.star else map(self.fn, items))


class Wrappers:
    """A pool's wrappers, one per function and kind while it is in use.

    The client caches a function's pickle (serialize.FunctionCache): a
    wrapper is cached there under the function it wraps and its kind
    (``identity``), so a new wrapper is no new pickle. A wrapper in use (a
    map's) is handed out again; none is kept alive here, nor its function.
    """

    def __init__(self, initializer: Callable[..., Any] | None, initargs: Iterable[Any] = (),
                 breaks: bool = False) -> None:
        self.init = Initializer(initializer, initargs, breaks) if initializer is not None else None
        self._lock = threading.Lock()
        self._live: weakref.WeakValueDictionary[tuple[int, int], Any] = weakref.WeakValueDictionary()

    def call(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """What to submit for one call of ``fn``: ``fn`` itself when there is no initializer."""
        if self.init is None:
            return fn
        init = self.init
        return self._get(fn, 0, lambda: Call(fn, init))

    def chunk(self, fn: Callable[..., Any], star: bool) -> Chunk:
        """What to submit, with a list of items as its one argument, for a chunk of calls."""
        return self._get(fn, 2 if star else 1, lambda: Chunk(fn, star, self.init))

    def _get(self, fn: Callable[..., Any], kind: int, make: Callable[[], _W]) -> _W:
        key = (id(fn), kind)
        with self._lock:
            wrapper = self._live.get(key)
            if wrapper is not None and wrapper.fn is fn:  # alive, it holds fn: the id is fn's
                return cast("_W", wrapper)  # made by the same make() for this kind
            wrapper = make()
            self._live[key] = wrapper
            return wrapper


def identity(fn: Callable[..., Any]) -> tuple[Any, Hashable]:
    """What ``fn``'s pickle depends on, for serialize.FunctionCache: ``(owner, kind)``.

    A Call or a Chunk is its function with its kind (and its pool's
    initializer); anything else is itself.
    """
    if isinstance(fn, Call):
        return fn.fn, ("call", fn.init.token)
    if isinstance(fn, Chunk):
        return fn.fn, ("chunk", fn.star, fn.init.token if fn.init is not None else None)
    return fn, ()


def function_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of the function a task runs (a map's chunk: its function's), for people."""
    owner = identity(fn)[0]
    qualname = getattr(owner, "__qualname__", None) or type(owner).__qualname__
    module = getattr(owner, "__module__", None) or ""
    return (f"{module}.{qualname}" if module else str(qualname))[:P.MAX_NAME]


def client_options(address: str | None, workers: int | None, max_tasks: int | None, max_tasks_name: str,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """The keywords of the Client an Executor or Pool makes, besides its address and secret.

    ``workers`` and ``max_tasks`` size and recycle the private cluster; a
    cluster at ``address`` is its agents' to size, and ``max_tasks`` (the
    caller's keyword ``max_tasks_name``) is ignored there with a warning.
    """
    kwargs = dict(extra)
    if address is None:
        kwargs["workers"] = workers
        if max_tasks:
            kwargs["max_tasks_per_worker"] = max_tasks
    elif max_tasks is not None:
        warnings.warn(f"{max_tasks_name} is ignored on the cluster at {address}: its agents recycle "
                      "workers (zpar-agent --max-tasks-per-worker N)", RuntimeWarning, stacklevel=3)
    return kwargs


class ClientLike(Protocol):
    """What ``Outstanding`` submits through: a ``Client`` (typed here so that this module need not import it)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)``; its future."""

    def cancel(self, futures: Iterable[concurrent.futures.Future[Any]], *, force: bool = False) -> int:
        """Cancel ``futures``; how many were."""

    def _abort(self, futures: Iterable[Future], exc: BaseException) -> None:
        """Fail ``futures`` with ``exc`` and stop their tasks."""


class Outstanding:
    """The futures an Executor or Pool has in flight, so that shutdown and join can wait for them.

    ``submit`` counts itself in while it runs (it may block on the client's
    window), so ``drain`` cannot miss a future that was being submitted when
    the facade closed. The lock is never held while blocking: a done-callback
    (on the client's I/O thread) may submit more.

    ``breaks_on``: a future failing with this error breaks the facade, as a
    failed initializer breaks a ``ProcessPoolExecutor``: every outstanding
    future fails with it (their tasks are stopped), and so does each later
    ``submit``.
    """

    def __init__(self, client: ClientLike, closed_error: Callable[[], Exception],
                 breaks_on: type[BaseException] | None = None) -> None:
        self.client = client
        self.futures: set[Future] = set()
        self._closed_error = closed_error
        self._refusal: Callable[[], BaseException] | None = None  # what submit raises, once closed or broken
        self._breaks_on = breaks_on
        self._done: Callable[[Any], object] = self.futures.discard if breaks_on is None else self._check
        self._cond = threading.Condition()
        self._submitting = 0
        self._closed = False
        self.broken: BaseException | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """``client.submit``, tracked; raises once ``close`` was called, or the facade broke."""
        return self.submit_via(self.client.submit, fn, *args, **kwargs)

    def submit_via(self, submit: Callable[..., Future], fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """``submit`` through ``submit`` (the client's with other TaskOptions: ``client.options(...).submit``)."""
        with self._cond:
            if self._refusal is not None:
                raise self._refusal()
            self._submitting += 1
        try:
            fut = submit(fn, *args, **kwargs)
            self.futures.add(fut)
        finally:
            with self._cond:
                self._submitting -= 1
                if not self._submitting:
                    self._cond.notify_all()
        fut.add_done_callback(self._done)  # after add(): a future already done is discarded now
        if self.broken is not None:  # it broke while this submit was on its way
            self.client._abort([fut], self.broken)
        return fut

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse further submits (with ``closed_error()``, unless broken already)."""
        with self._cond:
            self._closed = True
            if self._refusal is None:
                self._refusal = self._closed_error

    def _check(self, fut: Future) -> None:
        self.futures.discard(fut)
        if not fut.cancelled():
            exc = concurrent.futures.Future.exception(fut, 0)  # the stdlib's: zpar's would give up a stream
            if self._breaks_on is not None and isinstance(exc, self._breaks_on):
                self._break(exc)

    def _break(self, exc: BaseException) -> None:
        with self._cond:
            if self.broken is not None:
                return
            self.broken = exc
            self._refusal = lambda: _again(exc)
        self.client._abort([f for f in list(self.futures) if not f.done()], exc)

    def drain(self) -> None:
        """Wait for submits in progress, then until no future is outstanding."""
        with self._cond:
            self._cond.wait_for(lambda: not self._submitting)
        while True:  # again: a lazy imap may have added some meanwhile
            pending = [f for f in list(self.futures) if not f.done()]
            if not pending:
                return
            concurrent.futures.wait(pending)

    def cancel(self, force: bool = False) -> None:
        """Cancel every outstanding future (``force``: stop the tasks already running too)."""
        self.client.cancel(list(self.futures), force=force)


def _again(exc: BaseException) -> BaseException:
    """A new error like ``exc``, caused by it: raised by each submit to a broken facade."""
    again = type(exc)(*exc.args)
    again.__cause__ = exc
    return again
