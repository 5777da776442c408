"""zpar.Client behaviours, each run against both topologies: embedded (ipc) and broker + agents (TCP)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time

import numpy as np
import pytest
import tasks

import zpar
from zpar.errors import RemoteTraceback


@pytest.fixture(params=["embedded", "tcp"])
def make_client(request, cluster):
    """New clients with options: a private embedded cluster, or another producer on the TCP cluster."""
    made: list[zpar.Client] = []

    def make(**kwargs) -> zpar.Client:
        c = zpar.Client(**kwargs) if request.param == "embedded" else zpar.Client(cluster.frontend, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ---------------------------------------------------------------------- results


@pytest.mark.timeout(120)
def test_ten_thousand_tasks_give_correct_results(client):
    assert list(client.map(tasks.square, range(10_000), timeout=60)) == [i * i for i in range(10_000)]


@pytest.mark.timeout(120)
def test_bursts_of_submits_and_single_round_trips_never_stall(client):
    # A lost wake-up of the I/O thread once left tasks sitting in the client: it
    # showed within a few rounds of bursts followed by one-at-a-time round trips.
    for _ in range(15):
        burst = [client.submit(tasks.square, i) for i in range(3000)]
        assert [f.result(timeout=20) for f in burst] == [i * i for i in range(3000)]
        for i in range(100):
            assert client.submit(tasks.square, i).result(timeout=20) == i * i


def test_map_reads_a_generator_lazily_a_window_ahead(make_client):
    c = make_client(window=100)
    consumed = [0]

    def numbers(n):
        for i in range(n):
            consumed[0] = i + 1
            yield i

    results = c.map(tasks.square, numbers(10_000), timeout=60)
    assert consumed[0] <= 101, "map read far past its window before any result was read"
    assert next(results) == 0
    assert consumed[0] <= 102
    assert list(results) == [i * i for i in range(1, 10_000)]
    assert consumed[0] == 10_000


def test_submit_blocks_once_the_window_is_full_until_a_result_is_in(make_client, gate):
    c = make_client(window=2)
    blockers = [c.submit(tasks.block_until, gate, 30, i) for i in range(2)]
    third: list = []
    submitter = threading.Thread(target=lambda: third.append(c.submit(tasks.square, 3)))
    submitter.start()
    submitter.join(0.5)  # a bounded look for something that must not happen
    assert submitter.is_alive() and not third, "submit did not block with the window full"
    open(gate, "w").close()
    submitter.join(30)
    assert not submitter.is_alive()
    assert [b.result(timeout=30) for b in blockers] == [0, 1] and third[0].result(timeout=30) == 9


def test_map_keeps_input_order_with_chunks_and_several_iterables(client):
    assert list(client.map(tasks.add, range(1000), range(0, 3000, 3), chunksize=37)) == \
        [4 * i for i in range(1000)]
    assert list(client.map(tasks.add, range(10), range(3))) == [0, 2, 4]  # zip: the shortest wins


def test_imap_unordered_yields_every_result(client):
    assert sorted(client.imap_unordered(tasks.square, range(500))) == [i * i for i in range(500)]
    assert sorted(client.imap_unordered(tasks.square, range(500), chunksize=20)) == [i * i for i in range(500)]


def test_map_raises_the_tasks_exception_in_order(client):
    results = client.map(tasks.identity, [1, 2])
    assert list(results) == [1, 2]
    with pytest.raises(ValueError, match="bad input"):
        list(client.map(tasks.raise_value_error, ["bad input"]))


def test_map_timeout_raises_timeout_error(client, gate):
    results = client.map(tasks.block_until, [gate], timeout=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - start < 5


def test_as_completed_yields_every_future(client):
    futures = [client.submit(tasks.square, i) for i in range(50)]
    done = list(client.as_completed(futures, timeout=30))
    assert set(done) == set(futures)
    assert sorted(f.result() for f in done) == [i * i for i in range(50)]


def test_gather_returns_results_in_submission_order(client):
    futures = [client.submit(tasks.add, i, 1) for i in range(100)]
    assert client.gather(futures, timeout=30) == list(range(1, 101))


def test_lambdas_closures_and_keyword_arguments_run(client):
    offset = 17

    def shifted(x, *, scale=1):
        return x * scale + offset

    assert client.submit(lambda x: x + 1, 1).result(10) == 2
    assert client.submit(shifted, 2, scale=3).result(10) == 23
    assert list(client.map(lambda s: s.upper(), ["a", "b"])) == ["A", "B"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_large_numpy_array_round_trips_writable(client):
    array = np.arange(50 * 2**20 // 8, dtype=np.float64)  # 50 MiB
    result = client.submit(tasks.double, array).result(timeout=60)
    assert result.dtype == array.dtype and np.array_equal(result, array * 2)
    assert result.flags.writeable
    result[0] = -1.0
    echoed = client.submit(tasks.identity, array).result(timeout=60)
    assert np.array_equal(echoed, array) and echoed.flags.writeable


# ---------------------------------------------------------------------- errors


def test_task_exception_comes_back_as_its_own_type_with_remote_traceback(client):
    fut = client.submit(tasks.raise_value_error, "no such thing")
    with pytest.raises(ValueError, match="no such thing") as info:
        fut.result(timeout=10)
    exc = info.value
    assert "raise_value_error" in exc.remote_traceback and "ValueError: no such thing" in exc.remote_traceback
    assert exc.host == socket.gethostname()
    assert isinstance(exc.pid, int) and exc.pid != os.getpid()
    assert isinstance(exc.__cause__, RemoteTraceback) and "raise_value_error" in str(exc.__cause__)


def test_exception_that_cannot_be_unpickled_comes_back_as_task_error(client):
    with pytest.raises(zpar.TaskError) as info:
        client.submit(tasks.raise_unpicklable_error).result(timeout=10)
    exc = info.value
    assert exc.remote_type.endswith("NeedsTwoArgs") and "left/right" in str(exc)
    assert "raise_unpicklable_error" in exc.remote_traceback


def test_unpicklable_argument_is_refused_at_submit_naming_it(client):
    with pytest.raises(zpar.SerializationError, match="lock") as info:
        client.submit(tasks.identity, threading.Lock())
    assert isinstance(info.value, TypeError)
    assert client.submit(tasks.identity, 5).result(10) == 5  # the window slot was not lost


def test_unpicklable_result_gives_an_error_naming_it(client):
    with pytest.raises(zpar.SerializationError, match="lock"):
        client.submit(tasks.return_lock).result(timeout=10)


# ---------------------------------------------------------------------- futures


def test_future_is_awaitable_from_asyncio(client):
    async def main():
        one = await client.submit(tasks.square, 7)
        many = await asyncio.gather(*(client.submit(tasks.square, i) for i in range(10)))
        with pytest.raises(ValueError, match="async boom"):
            await client.submit(tasks.raise_value_error, "async boom")
        return one, many

    assert asyncio.run(main()) == (49, [i * i for i in range(10)])


def test_concurrent_futures_wait_accepts_zpar_futures(client):
    futures = [client.submit(tasks.square, i) for i in range(20)]
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert done == set(futures) and not not_done
    first = concurrent.futures.wait([client.submit(tasks.noop)], return_when=concurrent.futures.FIRST_COMPLETED,
                                    timeout=30)
    assert len(first.done) == 1
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)


@pytest.mark.timeout(120)
def test_two_producers_at_once_each_get_exactly_their_own_results(client):
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def produce(label):
        try:
            with zpar.Client(client.address) as own:
                results[label] = list(own.map(tasks.tag, [label] * 2000, range(2000), timeout=60))
        except BaseException as exc:  # noqa: BLE001 - a thread's error, surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(label,)) for label in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    for label in ("left", "right"):
        assert results[label] == [(label, i) for i in range(2000)]
