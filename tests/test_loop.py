"""The daemons' socket reader: oversized messages are skipped a slice at a time."""

from __future__ import annotations

import logging

import pytest
import zmq

from zpar import _loop as daemon


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
    for _ in range(10):  # inproc delivers in order at send: one drain reads all three
        if len(got) == 2:
            break
        reader.drain()
    assert got == [b"one", b"two"] and errors == [1]


def test_a_client_drops_an_oversized_message_from_its_broker_and_keeps_working():
    """The producer's socket is bounded too: a broker (or anything posing as one) cannot make it build
    a 20,000-part message; the next good message is read as usual."""
    import threading

    import zpar
    from zpar import protocol as P
    from zpar import serialize

    ctx = zmq.Context.instance()
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    port = broker.bind_to_random_port("tcp://127.0.0.1")
    made: list = []
    # The fake broker speaks no CurveZMQ: the client must be told so (insecure=True).
    thread = threading.Thread(target=lambda: made.append(zpar.Client(f"tcp://127.0.0.1:{port}", connect_timeout=10,
                                                                     insecure=True)))
    thread.start()
    try:
        assert broker.poll(10_000)
        peer, hello = P.decode_routed(broker.recv_multipart())
        assert isinstance(hello, P.Hello)
        broker.send_multipart(P.encode_routed(peer, P.Welcome("e" * 32, 1.0, 3)))
        thread.join(10)
        client = made[0]
        fut = client.submit(len, "abc")
        while True:  # skip heartbeats until the SUBMIT
            assert broker.poll(10_000)
            peer, msg = P.decode_routed(broker.recv_multipart())
            if isinstance(msg, P.Submit):
                break
        broker.send_multipart([*P.encode_routed(peer, P.Heartbeat()), *([b""] * (P.MAX_FRAMES + 50))])
        entry = P.ResultEntry(msg.tasks[0].id, P.Status.OK, serialize.dumps(3), 5)
        broker.send_multipart(P.encode_routed(peer, P.Result((entry,))))
        assert fut.result(timeout=10) == 3
        client.close()
    finally:
        thread.join(10)
        broker.close(linger=0)
