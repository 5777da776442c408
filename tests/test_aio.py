"""asyncio: zpar futures are awaitable, and as_completed_async yields them as they finish, on both topologies."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading

import pytest
import tasks

from zpar.aio import as_completed_async


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_future_is_awaitable_and_gatherable(client):
    async def main():
        one = await client.submit(tasks.square, 7)
        many = await asyncio.gather(*(client.submit(tasks.square, i) for i in range(5)))
        return one, many

    assert run(main()) == (49, [0, 1, 4, 9, 16])


def test_a_task_exception_is_raised_by_await(client):
    async def main():
        await client.submit(tasks.raise_value_error, "async boom")

    with pytest.raises(ValueError, match="async boom"):
        run(main())


def test_as_completed_async_yields_each_future_once_as_it_finishes(client, gate):
    async def main():
        # The fast ones first: none may wait behind the slow one in an agent's queue.
        fast = [client.submit(tasks.square, i) for i in range(6)]
        slow = client.submit(tasks.block_until, gate, 30, "slow")
        order = []
        async for fut in as_completed_async([slow, *fast, fast[0]]):  # a duplicate is yielded once
            order.append(fut)
            if len(order) == len(fast):
                assert slow not in order
                open(gate, "w").close()  # noqa: ASYNC230 - only now can the slow one finish
        return slow, fast, order

    slow, fast, order = run(main())
    assert order[-1] is slow and set(order[:-1]) == set(fast) and len(order) == 7
    assert sorted(f.result() for f in fast) == [i * i for i in range(6)]


def test_as_completed_async_takes_futures_already_done_and_failed_ones(client):
    done = client.submit(tasks.square, 3)
    assert done.result(timeout=10) == 9
    failed = client.submit(tasks.raise_value_error, "x")
    cancelled: cf.Future = cf.Future()
    cancelled.cancel()

    async def main():
        return [f async for f in as_completed_async([done, failed, cancelled])]

    out = run(main())
    assert set(out) == {done, failed, cancelled}
    assert isinstance(failed.exception(), ValueError)


def test_as_completed_async_raises_timeout_error_when_not_all_finish(client, gate):
    async def main():
        quick = client.submit(tasks.square, 2)
        blocked = client.submit(tasks.block_until, gate)
        seen = []
        with pytest.raises(TimeoutError, match="1 \\(of 2\\) futures unfinished"):  # noqa: PT012 - raised by the loop
            async for fut in as_completed_async([blocked, quick], timeout=1.0):
                seen.append(fut)
        return seen, quick

    seen, quick = run(main())
    assert seen == [quick]


def test_as_completed_async_of_nothing_ends_at_once():
    async def main():
        return [f async for f in as_completed_async([])]

    assert run(main()) == []


def test_futures_completed_on_another_thread_wake_the_loop():
    """Not zpar's: any concurrent.futures.Future, set from a plain thread, with no polling."""
    futures = [cf.Future() for _ in range(3)]

    def finish_backwards():
        for i in reversed(range(3)):
            futures[i].set_result(i)

    async def main():
        asyncio.get_running_loop().call_soon(threading.Thread(target=finish_backwards).start)
        return [f.result() async for f in as_completed_async(futures, timeout=10)]

    assert run(main()) == [2, 1, 0]
