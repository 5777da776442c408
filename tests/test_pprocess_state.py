"""Each zpar.pprocess call starts with random generators as a forked child of its parent would, on Python 3.

pprocess forks a child per call. Python 3 reseeds ``random`` in every forked
child (os.register_at_fork), so calls draw their own numbers whatever the
parent seeded; numpy's global generator is copied as the parent had it, so
calls started while the parent draws nothing draw the same numbers. zpar's
workers outlive calls; these tests show that a call sees neither what an
earlier call on its worker did to the generators, nor the worker's own.
"""

from __future__ import annotations

import random
import sys

import cloudpickle
import pytest

import zpar
from zpar import pprocess

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # these tasks travel by value


@pytest.fixture
def one_worker():
    """A cluster of one worker: every call runs on the same process, after the one before."""
    with zpar.Client(workers=1) as client:
        yield client


def draw(seed):
    """Seeds ``random`` first if ``seed`` is not None; then one number from it."""
    if seed is not None:
        random.seed(seed)
    return random.random()


def draw_numpy(seed):
    import numpy

    if seed is not None:
        numpy.random.seed(seed)
    return float(numpy.random.random())


def worker_state(_):
    """What the worker's own generator gives next, without moving it."""
    return random.getstate()


def test_calls_draw_from_freshly_seeded_random_whatever_the_parent_seeded(one_worker):
    random.seed(0)
    values = list(pprocess.pmap(draw, [None] * 6, client=one_worker))
    assert len(set(values)) == 6
    assert random.Random(0).random() not in values


def test_a_call_that_seeds_random_does_not_fix_the_numbers_of_the_calls_after_it(one_worker):
    values = list(pprocess.pmap(draw, [7, None, None], client=one_worker))
    seeded = random.Random(7)
    assert values[0] == seeded.random()
    assert values[1:] != [seeded.random(), seeded.random()]  # a worker carrying its state would give these
    assert values[1] != values[2]


def test_every_call_starts_from_the_parents_numpy_state_as_forked_children_do(one_worker):
    numpy = pytest.importorskip("numpy")
    saved = numpy.random.get_state()
    try:
        numpy.random.seed(3)
        expected = numpy.random.RandomState(3).random_sample(2)
        assert list(pprocess.pmap(draw_numpy, [None] * 3, client=one_worker)) == [expected[0]] * 3
        numpy.random.random()  # the parent draws one: the next calls start from there
        assert list(pprocess.pmap(draw_numpy, [None] * 2, client=one_worker)) == [expected[1]] * 2
        # and a call that seeds numpy does not change what the next call starts from
        assert list(pprocess.pmap(draw_numpy, [11, None], client=one_worker))[1] == expected[1]
    finally:
        numpy.random.set_state(saved)


def test_a_call_leaves_the_workers_own_generator_as_it_was(one_worker):
    before = one_worker.submit(worker_state, None).result(timeout=30)
    first, _ = pprocess.pmap(draw, [5, None], client=one_worker)
    assert first == random.Random(5).random()
    assert one_worker.submit(worker_state, None).result(timeout=30) == before


def test_channel_aware_calls_start_as_forked_children_too(one_worker):
    def sender(channel, seed):
        channel.send((seed, draw(seed)))
        channel.send((seed, draw(None)))

    queue = pprocess.Queue(client=one_worker)
    queue.start(sender, 9)
    queue.start(sender, None)
    got = list(queue)  # one message of each ready call per store(): the two calls may interleave
    seeded = random.Random(9)
    assert [value for seed, value in got if seed == 9] == [seeded.random(), seeded.random()]
    assert [value for seed, value in got if seed is None] != [seeded.random(), seeded.random()]
