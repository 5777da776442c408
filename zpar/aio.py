"""asyncio: futures as they finish, in the caller's event loop.

A zpar Future is awaitable as it is (``await client.submit(fn, x)``), and
``asyncio.gather`` takes them. ``as_completed_async`` adds the async form of
``concurrent.futures.as_completed``::

    async for fut in zpar.as_completed_async([client.submit(f, x) for x in xs]):
        print(fut.result())

No second event loop and no polling: each future's done-callback (run on the
client's I/O thread) hands the future to the loop with
``loop.call_soon_threadsafe``, into an ``asyncio.Queue`` the iterator awaits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

__all__ = ["as_completed_async"]

T = TypeVar("T")


async def as_completed_async(
    futures: Iterable[concurrent.futures.Future[T]],
    timeout: float | None = None,  # noqa: ASYNC109 - concurrent.futures.as_completed's signature
) -> AsyncIterator[concurrent.futures.Future[T]]:
    """Yield each of ``futures`` once it is done (result, exception or cancelled), in that order.

    Any ``concurrent.futures.Future`` works, zpar's or not; duplicates are
    yielded once. Raises TimeoutError if they are not all done ``timeout``
    seconds after the iteration starts, like ``concurrent.futures.as_completed``.
    Must run in an event loop; leaving the loop early leaves the futures as
    they are (cancel them if they are no longer wanted).
    """
    fs = set(futures)
    if not fs:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Queue[concurrent.futures.Future[T]] = asyncio.Queue()

    def on_done(fut: concurrent.futures.Future[T]) -> None:  # on whichever thread completed it
        try:
            loop.call_soon_threadsafe(done.put_nowait, fut)
        except RuntimeError:  # the loop was closed: nobody is iterating any more
            pass

    for fut in fs:
        fut.add_done_callback(on_done)  # a future already done calls it now, on this thread
    deadline = None if timeout is None else loop.time() + timeout
    for left in range(len(fs), 0, -1):
        try:
            async with asyncio.timeout_at(deadline):  # around the wait only, never around a yield
                fut = await done.get()
        except TimeoutError:
            raise TimeoutError(f"{left} (of {len(fs)}) futures unfinished after {timeout:g} s") from None
        yield fut
