"""The daemons' socket reader: oversized messages are skipped a slice at a time."""

from __future__ import annotations

import logging

import pytest
import zmq

from zpar import daemon


@pytest.fixture
def pair():
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind("inproc://reader-test")
    dealer.connect("inproc://reader-test")
    yield router, dealer
    router.close(linger=0)
    dealer.close(linger=0)


def test_an_oversized_message_is_dropped_and_the_next_ones_are_read(pair, monkeypatch):
    router, dealer = pair
    monkeypatch.setattr(daemon, "SKIP_SLICE", 100)
    got, oversized = [], []
    reader = daemon.Reader(router, lambda frames: got.append([f.bytes for f in frames[1:]]),
                           logging.getLogger("test"), max_frames=10, on_oversized=lambda: oversized.append(1))
    dealer.send_multipart([b"first"])
    dealer.send_multipart([b""] * 1_000)  # 10 slices of 100 past the limit
    dealer.send_multipart([b"after", b"it"])
    assert router.poll(5000)
    turns = 0
    while len(got) < 2:
        assert turns < 20, "the reader did not get past the oversized message"
        reader.drain()
        turns += 1
    assert got == [[b"first"], [b"after", b"it"]]
    assert oversized == [1]
    assert turns >= 10, "the oversized message should take several turns, leaving the loop free in between"


def test_a_handler_that_raises_drops_only_its_message(pair):
    router, dealer = pair
    got, errors = [], []

    def handler(frames):
        if frames[1].bytes == b"bad":
            raise ValueError("boom")
        got.append(frames[1].bytes)

    reader = daemon.Reader(router, handler, logging.getLogger("test"), on_error=lambda: errors.append(1))
    for body in (b"one", b"bad", b"two"):
        dealer.send(body)
    assert router.poll(5000)
    while len(got) < 2:
        reader.drain()
    assert got == [b"one", b"two"] and errors == [1]
