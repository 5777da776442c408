"""zpar.pprocess's exchanges call pprocess's scheduling hooks where pprocess calls them.

Subclasses steer an exchange by overriding ``_set_waiting``, ``_get_waiting``,
``start_waiting`` and ``_get_channel_for_process``; ``waiting`` holds
``(callable, args, kw)``, the next to start last; ``store()`` removes a
channel whose ``store_data`` raised OSError, with a warning, as pprocess 0.5.1 does.
"""

from __future__ import annotations

import sys

import cloudpickle
import pytest

from zpar import pprocess

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # these tasks travel by value


def identity(x):
    return x


def add(a, b=0):
    return a + b


def missing(path):
    with open(path) as f:
        return f.read()


def test_the_module_says_which_pprocess_it_follows():
    assert pprocess.__version__ == "0.5.1"


def test_waiting_holds_callable_args_and_kw_the_next_to_start_last(embedded_client):
    exchange = pprocess.Queue(limit=1, client=embedded_client)
    calc = pprocess.MakeParallel(add)
    exchange.start(calc, 1)
    exchange.start(calc, 2, b=10)
    exchange.start(calc, 3)
    assert exchange.waiting == [(calc, (3,), {}), (calc, (2,), {"b": 10})]
    assert list(exchange) == [1, 12, 3]


def test_a_subclass_choosing_the_newest_waiting_call_changes_the_order(embedded_client):
    class Newest(pprocess.Queue):
        def _get_waiting(self, channel):
            return self.waiting.pop(0) if self.waiting else None

    queue = Newest(limit=1, client=embedded_client)
    for i in range(5):
        queue.start(pprocess.MakeParallel(identity), i)
    assert list(queue) == [0, 4, 3, 2, 1]


def test_a_subclass_that_never_queues_starts_each_call_once_there_is_room(embedded_client):
    class NoQueue(pprocess.Queue):
        def _set_waiting(self, callable, args, kw):
            return 0

    queue = NoQueue(limit=2, client=embedded_client)
    for i in range(6):
        queue.start(pprocess.MakeParallel(identity), i)  # add_wait stores results to make room
        assert queue.waiting == [] and len(queue.active()) <= 2
    queue.finish()
    assert sorted(queue.queue) == list(range(6))


def test_start_waiting_is_asked_after_every_message(embedded_client):
    class Count(pprocess.Queue):
        asked = 0

        def start_waiting(self, channel):
            self.asked += 1
            super().start_waiting(channel)

    queue = Count(limit=2, client=embedded_client)
    for i in range(5):
        queue.start(pprocess.MakeParallel(identity), i)
    assert sorted(queue) == list(range(5))
    assert queue.asked == 5


def test_continuous_exchanges_start_waiting_calls_once_no_channel_is_left(embedded_client):
    def rows(channel, i):
        for j in range(3):
            channel.send((i, j))

    queue = pprocess.Queue(limit=2, continuous=1, client=embedded_client)
    for i in range(4):
        queue.start(rows, i)
    got = list(queue)
    assert sorted(got) == [(i, j) for i in range(4) for j in range(3)]
    assert {i for i, _ in got[:6]} == {0, 1}  # as pprocess: the waiting two start when the first two are done


def test_get_channel_for_process_receives_each_forked_channel():
    class Record(pprocess.Queue):
        def _get_channel_for_process(self, channel):
            if channel.pid:
                self.forked.append(channel.pid)
            return super()._get_channel_for_process(channel)

    queue = Record()
    queue.forked = []
    for i in range(2):
        channel = queue.create()
        if channel:
            try:
                channel.send(i)
            finally:
                pprocess.exit(channel)
    assert len(queue.forked) == 2 and all(queue.forked)
    assert sorted(queue) == [0, 1]


def test_store_removes_a_channel_whose_data_raises_oserror_with_a_warning(embedded_client, tmp_path):
    queue = pprocess.Queue(client=embedded_client)
    queue.start(pprocess.MakeParallel(identity), 1)
    queue.start(pprocess.MakeParallel(missing), str(tmp_path / "absent"))  # FileNotFoundError, an OSError
    queue.start(pprocess.MakeParallel(identity), 3)
    with pytest.warns(RuntimeWarning, match="FileNotFoundError|No such file"):
        got = sorted(queue)
    assert got == [1, 3]


def test_other_errors_in_store_data_still_propagate(embedded_client):
    queue = pprocess.Queue(client=embedded_client)
    queue.start(pprocess.MakeParallel(add), "a", 1)  # TypeError
    with pytest.raises(TypeError):
        list(queue)
