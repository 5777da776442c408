"""The one mapping implementation: ``Client.map``/``imap``/``imap_unordered``, ``Executor.map``, ``Pool``'s maps.

A map is a function over a stream of calls. ``plan`` turns the function and
its items into ``Work``: one task per call, or, with a ``chunksize``, one task
per list of calls (``_wrappers.Chunk``, cached per function by ``Wrappers``,
as multiprocessing's ``mapstar``). ``Results`` submits that work through any
``submit(fn, *args) -> Future`` and hands out the results::

    items ──plan──▶ Work(task, calls) ──Results: submit a window ahead──▶ futures ──next()──▶ values
                                                                          (chunks flattened)

``MapOptions`` holds what differs between the callers: the order, the window
(``None``: everything now, as ``Executor.map`` must), a deadline for the whole
call and the error a timeout raises, and what an error or an early exit does
(a generator's contract: the iteration ends and what is pending is cancelled;
or multiprocessing's: ``next`` goes on past it).

This module knows nothing of the Client: no import cycle, and a plain
``concurrent.futures.Future`` is enough to test it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import queue
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, Protocol

#: ``submit(fn, *args)``: start ``fn(*args)`` somewhere, return its future.
Submit = Callable[..., cf.Future[Any]]

_END = object()


class Wrapping(Protocol):
    """What a map submits for a function (``_wrappers.Wrappers``)."""

    def call(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """What to submit for one call of ``fn``."""

    def chunk(self, fn: Callable[..., Any], star: bool) -> Callable[[list[Any]], list[Any]]:
        """What to submit, with a list of items as its one argument, for a chunk of calls."""


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """``submit(task, *args)`` for each ``args`` of ``calls``; ``chunked``: each result is a list to flatten."""

    task: Callable[..., Any]
    calls: Iterator[Any]
    chunked: bool


def plan(fn: Callable[..., Any], items: Iterable[Any], *, star: bool, chunksize: int | None,
         wrappers: Wrapping) -> Work:
    """``fn(x)`` for each item (``fn(*x)`` when ``star``), as tasks; the items are read lazily.

    ``chunksize`` None: one call per task. A number: lists of that many calls
    (the last shorter) as one task each, even lists of one (as ``Pool.map``).
    """
    if chunksize is None:
        return Work(wrappers.call(fn), iter(items) if star else zip(items), False)
    if chunksize < 1:  # lists of none would end the map at once, silently
        raise ValueError(f"chunksize must be at least 1, not {chunksize}")
    it = iter(items)
    chunks = iter(lambda: list(itertools.islice(it, chunksize)), [])
    return Work(wrappers.chunk(fn, star), zip(chunks), True)  # zip(): (chunk,), the task's one argument


def over(fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], chunksize: int | None,
         wrappers: Wrapping) -> Work:
    """``fn`` over the zipped ``iterables``, as the stdlib's ``map``; a ``chunksize`` of 1 or less is no chunking."""
    if len(iterables) == 1:
        items, star = iterables[0], False  # no 1-tuple per item: chunks pickle smaller, Chunk calls fn(x)
    else:
        items, star = zip(*iterables, strict=False), True  # the shortest ends it, as map()
    return plan(fn, items, star=star, chunksize=chunksize if chunksize and chunksize > 1 else None, wrappers=wrappers)


def submit_all(submit: Submit, work: Work) -> list[cf.Future[Any]]:
    """Every task of ``work`` submitted now; their futures in input order."""
    task = work.task
    return [submit(task, *args) for args in work.calls]


@dataclasses.dataclass(frozen=True, slots=True)
class MapOptions:
    """How ``Results`` submits and hands out.

    ``ordered``: results in input order, else as they complete. ``window``:
    the most tasks in flight, input read lazily; None submits every task at
    once. ``timeout``: seconds from the call by which every result must be in
    (``next(timeout)`` can also bound each wait); ``timeout_error``: the
    exception either raises. ``errors_end``: a task's exception or a timeout
    ends the iteration, as in a generator; else ``next`` goes on past it.
    ``cancel_on_exit``: what is still pending is cancelled when the iteration
    ends early (an error with ``errors_end``, ``close()``, or the iterator
    being dropped). ``clock``: where the deadline is read (monotonic seconds).
    """

    ordered: bool = True
    window: int | None = None
    timeout: float | None = None
    timeout_error: type[Exception] = TimeoutError
    errors_end: bool = True
    cancel_on_exit: bool = True
    clock: Callable[[], float] = time.monotonic


class Results:
    """The results of a ``Work``, submitted through ``submit`` as ``options`` say; an iterator.

    The first window (or every task) is submitted when it is made; each
    result taken lets one more task go. Not thread-safe, except ``ready``:
    one consumer at a time (Pool's iterator holds a lock).

    A ``for`` loop, ``list()`` or ``next()`` over a map that ends on errors
    reads one generator (``_Map.values``), or for chunks an ``itertools.chain``
    over them (``_Map.chunks``): no Python call per item of a chunk.
    ``next(timeout)`` is Pool's way in, one item at a time; a map is read one
    way or the other.
    """

    __slots__ = ("_chain", "_map", "ready")

    def __init__(self, submit: Submit, work: Work, options: MapOptions) -> None:
        self._chain: Iterator[Any] | None = None
        self._map = _Map(submit, work, options)
        #: Values of a chunk already in, not handed out yet. ``popleft()`` is safe from any thread.
        self.ready = self._map.ready

    def __iter__(self) -> Iterator[Any]:
        if not self._map.errors_end:
            return self  # next() goes on past an error: one item at a time
        fast = self._chain
        if fast is None:  # one per map: a chunk half read stays where the next loop finds it
            # It holds the map, not this object: a for loop over a temporary still finds the
            # map alive, and the map is let go (and cancelled) with the loop.
            fast = self._chain = (itertools.chain.from_iterable(self._map.chunks()) if self._map.chunked
                                  else self._map.values())
        return fast

    def __next__(self) -> Any:
        if self._map.errors_end:
            return next(self.__iter__())  # the same stream a for loop reads
        return self._map.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; StopIteration after the last.

        Raises the task's exception in its place, and ``timeout_error`` if no
        result is in within ``timeout`` seconds or by the map's deadline
        (nothing is taken then). With ``errors_end`` either ends the iteration.
        """
        return self._map.next(timeout)

    def close(self) -> None:
        """Read no more input and let go of what is pending, cancelled if ``cancel_on_exit``."""
        self._map.close()


class _Map:
    """What ``Results`` reads: the tasks in flight, the input, the deadline; cancelled when let go."""

    _cancel, _count = False, 0  # for __del__ if __init__ failed early

    def __init__(self, submit: Submit, work: Work, options: MapOptions) -> None:
        # Everything set before the first submit: close() and __del__ may run on a half-made map.
        self._submit, self._task, self._calls, self.chunked = submit, work.task, work.calls, work.chunked
        self.errors_end, self._cancel = options.errors_end, options.cancel_on_exit
        self._ordered = options.ordered
        self._window = sys.maxsize if options.window is None else options.window
        self._timeout, self._timeout_error = options.timeout, options.timeout_error
        self._clock = options.clock
        self._deadline = None if options.timeout is None else self._clock() + options.timeout
        self.ready: collections.deque[Any] = collections.deque()
        self._count = 0  # tasks submitted, not yet taken
        self._more = True  # the input may have more
        self._in_order: collections.deque[cf.Future[Any]] = collections.deque()  # ordered: pending, in order
        self._flying: set[cf.Future[Any]] = set()  # unordered: pending
        self._done: queue.SimpleQueue[cf.Future[Any]] = queue.SimpleQueue()  # unordered: as they complete
        self._fill()

    def next(self, timeout: float | None = None) -> Any:
        """One value (see ``Results.next``)."""
        ready = self.ready
        while True:
            if ready:
                try:
                    return ready.popleft()
                except IndexError:  # another thread took it (Pool's unlocked fast path)
                    pass
            if not self._count:
                raise StopIteration
            value = self._value(timeout)
            if not self.chunked:
                return value
            ready.extend(value)

    def values(self) -> Iterator[Any]:
        """Each value in turn, unchunked (``errors_end`` only: an error ends it)."""
        while self._count:
            yield self._value(None)  # not kept in a local: the consumer alone holds what it took

    def chunks(self) -> Iterator[Iterator[Any]]:
        """Each chunk's values, as an iterator that lets go of each value it hands out (``errors_end`` only)."""
        ready = self.ready
        while True:
            if ready:  # left by next()
                values = collections.deque(ready)
                ready.clear()
            elif self._count:
                values = collections.deque(self._value(None))
            else:
                return
            # popleft() per value, in C, with no comparison with a sentinel (an array's == is no bool).
            yield itertools.starmap(values.popleft, itertools.repeat((), len(values)))

    def _value(self, timeout: float | None) -> Any:
        """The next task's value (a chunk's list), or its exception raised; there is one to take."""
        fut = self._take(timeout)
        try:
            value = fut.result()  # in order and without a timeout, the wait is here
        except BaseException:
            waiting = not fut.done()  # interrupted while it waited (KeyboardInterrupt): still pending
            if waiting:
                self._put_back(fut)
            if self.errors_end:
                self.close()
            elif self._more and not waiting:
                self._fill(fut)
            raise
        if self._more:  # not once the input has ended (always, when every task went at once)
            self._fill(fut)
        return value

    def close(self) -> None:
        """Read no more input and let go of what is pending, cancelled if ``cancel_on_exit``."""
        self._more = False
        pending = [*self._in_order, *self._flying]
        self._in_order.clear()
        self._flying.clear()
        self._count = 0
        self.ready.clear()
        if self._cancel:
            for fut in pending:
                fut.cancel()

    def __del__(self) -> None:
        # A consumer that leaves a for loop early drops its iterator (and the map): as a generator's finally would.
        if self._cancel and self._count:
            self.close()

    # ------------------------------------------------------------------ inside

    def _fill(self, taken: cf.Future[Any] | None = None) -> None:
        """Submit until the window is full or the input ends.

        If reading the input or a submit fails, the map ends when it ends on
        errors or had not started (``taken`` None: nothing of it should run);
        else ``taken``, the future just taken, goes back: its result comes with
        the next call instead of being lost.
        """
        submit, task = self._submit, self._task
        try:
            while self._more and self._count < self._window:
                args: Any = next(self._calls, _END)
                if args is _END:
                    self._more = False  # never read an ended input again
                    return
                fut = submit(task, *args)
                self._count += 1
                if self._ordered:
                    self._in_order.append(fut)
                else:
                    self._flying.add(fut)
                    fut.add_done_callback(self._done.put)
        except BaseException:
            if self.errors_end or taken is None:
                self.close()
            else:
                self._put_back(taken)
            raise

    def _put_back(self, taken: cf.Future[Any]) -> None:
        self._count += 1
        if self._ordered:
            self._in_order.appendleft(taken)
        else:
            self._flying.add(taken)
            self._done.put(taken)

    def _take(self, timeout: float | None) -> cf.Future[Any]:
        """The next future, taken off what is pending: done, or, in order without a timeout, to wait for.

        Nothing is taken if it times out.
        """
        wait = timeout
        if self._deadline is not None:
            left = max(0.0, self._deadline - self._clock())
            wait = left if timeout is None else min(left, timeout)
        if self._ordered:
            fut = self._in_order[0]
            if wait is not None and not fut.done():  # result() could not tell its timeout from the task's
                try:
                    fut.exception(wait)  # waits; only the wait raises TimeoutError here
                except cf.CancelledError:
                    pass
                except cf.TimeoutError:
                    self._timed_out(timeout)
            self._in_order.popleft()
        else:
            try:
                fut = self._done.get(timeout=wait)
            except queue.Empty:
                self._timed_out(timeout)
            self._flying.discard(fut)
        self._count -= 1
        return fut

    def _timed_out(self, timeout: float | None) -> NoReturn:
        late = self._count
        if timeout is None or (self._deadline is not None and self._clock() >= self._deadline):
            message = f"{late} results not in within {self._timeout:g} s of the map call"
        else:
            message = f"no result within {timeout:g} s"
        if self.errors_end:
            self.close()
        raise self._timeout_error(message)
