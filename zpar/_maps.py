"""The maps behind ``Client.map``, ``imap`` and ``imap_unordered``: lazy input, a bounded window."""

from __future__ import annotations

import collections
import itertools
import queue
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from . import protocol as P
from .futures import Future
from .options import TaskOptions

if TYPE_CHECKING:
    from .client import Client


def _task_stream(iterables: tuple[Iterable[Any], ...], chunksize: int | None) -> Iterator[tuple[Any, int]]:
    args = zip(*iterables)
    if not chunksize or chunksize <= 1:
        return (((a, {}), 0) for a in args)
    chunks = iter(lambda: list(itertools.islice(args, chunksize)), [])
    return ((chunk, P.FLAG_CHUNK) for chunk in chunks)

def ordered(client: "Client", opts: TaskOptions, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
            chunksize: int | None, timeout: float | None) -> Iterator[Any]:
    """Submit a window ahead now; yield results in input order (Client.map)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    stream = _task_stream(iterables, chunksize)
    pending: collections.deque[tuple[Future, int]] = collections.deque()

    def fill() -> None:
        while len(pending) < client._window_size:
            item = next(stream, None)
            if item is None:
                return
            pending.append((client._submit(fn, item[0], item[1], opts), item[1]))

    fill()  # start now, as Executor.map does

    def results() -> Iterator[Any]:
        try:
            while pending:
                fut, flags = pending[0]
                left = None if deadline is None else deadline - time.monotonic()
                value = fut.result(left)
                pending.popleft()
                fill()
                if flags & P.FLAG_CHUNK:
                    yield from value
                else:
                    yield value
        finally:
            for fut, _ in pending:
                fut.cancel()

    return results()

def unordered(client: "Client", opts: TaskOptions, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
              chunksize: int | None, timeout: float | None) -> Iterator[Any]:
    """Submit a window ahead now; yield results as they complete (Client.imap_unordered)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    stream = _task_stream(iterables, chunksize)
    done: queue.SimpleQueue[tuple[Future, int]] = queue.SimpleQueue()
    pending: set[Future] = set()

    def fill() -> None:
        while len(pending) < client._window_size:
            item = next(stream, None)
            if item is None:
                return
            fut = client._submit(fn, item[0], item[1], opts)
            pending.add(fut)
            flags: int = item[1]
            fut.add_done_callback(lambda f, flags=flags: done.put((f, flags)))  # type: ignore[misc]

    fill()

    def results() -> Iterator[Any]:
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    fut, flags = done.get(timeout=left)
                except queue.Empty:
                    raise TimeoutError(f"{len(pending)} results not in within the timeout") from None
                pending.discard(fut)
                fill()
                value = fut.result()
                if flags & P.FLAG_CHUNK:
                    yield from value
                else:
                    yield value
        finally:
            for fut in pending:
                fut.cancel()

    return results()
