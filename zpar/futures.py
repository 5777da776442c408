"""The Future that ``Client.submit`` returns."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Generator


class Future(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` for a zpar task; also awaitable from asyncio.

    ``concurrent.futures.wait`` and ``as_completed`` accept it as they are.
    ``cancel()`` succeeds until the result is in: a queued task is dropped by
    the broker and never runs; the result of one already running is discarded,
    or, with ``cancel(force=True)``, its worker is stopped.
    """

    def __init__(self, task_id: int = 0, on_cancel: Callable[["Future", bool], None] | None = None) -> None:
        super().__init__()
        self.task_id = task_id
        self._on_cancel = on_cancel

    def cancel(self, force: bool = False) -> bool:
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel(self, force)
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<zpar.Future task {self.task_id} {self._state.lower()}>"
