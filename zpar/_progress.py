"""Progress bars where people look: ``zpar.progress(futures)`` and ``map(..., progress=True)``.

Drawn by rich: a bar that redraws in place in a terminal (on stderr), and in
Jupyter a live one in the cell's output (an ipywidgets Output widget: rich needs ipywidgets for it);
where neither is live (a log file), the last state once, when the work is done. rich is imported on first use,
not with zpar.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

_T = TypeVar("_T")
_F = TypeVar("_F", bound=cf.Future[Any])

#: Seconds between two updates of a bar's count (the display itself redraws 10 times a second).
UPDATE_EVERY = 0.05


class _Bar:
    """One rich progress bar, from ``__enter__`` to ``__exit__``."""

    def __init__(self, description: str, total: int | None, console: Console | None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress: Progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console or _default_console(), refresh_per_second=10)
        self._task: TaskID = self._progress.add_task(description, total=total)
        self._next = 0.0

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def at(self, done: int, force: bool = False) -> None:
        """``done`` of the total are finished; the bar shows it at most every UPDATE_EVERY s (or now)."""
        now = time.monotonic()
        if force or now >= self._next:
            self._next = now + UPDATE_EVERY
            self._progress.update(self._task, completed=done)


def _default_console() -> Console:
    """Where a bar goes unless told: stderr, as for logs (stdout stays the program's)."""
    from rich.console import Console

    return Console(stderr=True)


def progress(futures: Iterable[_F], *, description: str = "tasks", console: Console | None = None) -> list[_F]:
    """Draw a progress bar of ``futures`` as they finish, and return them (a list) once all have.

    Any ``concurrent.futures.Future`` will do (zpar's, an Executor's). Failed and cancelled
    futures count as finished; their errors stay in them, for ``result()``.
    ``console``: a ``rich.console.Console`` to draw on (stderr's by default).
    Ctrl-C stops the wait, not the tasks.
    """
    futures = list(futures)
    finished: queue.SimpleQueue[object] = queue.SimpleQueue()
    with _Bar(description, len(futures), console) as bar:
        for fut in futures:
            fut.add_done_callback(finished.put)  # at once if it is done already
        for done in range(1, len(futures) + 1):
            finished.get()
            bar.at(done, force=done == len(futures))
    return futures


def track(results: Iterable[_T], total: int | None, description: str,
          console: Console | None = None) -> Iterator[_T]:
    """``results``, drawing a bar of how many were handed out (of ``total``, if known) as they go.

    Leaving the loop early closes ``results`` too (a map's pending tasks are
    cancelled as they would be without the bar).
    """
    done = 0
    try:
        with _Bar(description, total, console) as bar:
            for value in results:
                done += 1
                bar.at(done)
                yield value
            bar.at(done, force=True)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def known_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls a map over the zipped ``iterables`` makes, if each has a length; else None."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a generator; no iterable at all
        return None
