"""The stream window (zpar._flow), driven by hand: no cluster, no sleeps.

A sender runs at most a window of items, and a byte budget, ahead of what its
receiver took; the receiver grants credit every half window or quarter budget
taken; a credit frees the bytes of what it says was taken; repeats are
dropped and a gap breaks the stream. Then the producer's StreamState, which
holds these windows under its lock.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zpar import protocol as P
from zpar import serialize, streaming
from zpar._flow import WINDOW, WINDOW_BYTES, Arrival, ReceiveWindow, SendWindow

# Small windows keep the hand-driven sequences readable; the rule is the same.
W, B = 4, 100


def fill(window: SendWindow, size: int = 1) -> list[int]:
    """Send items of ``size`` bytes while the window lets them go; their seqs."""
    seqs = []
    while window.may_send():
        seqs.append(window.sent(size))
    return seqs


# ---------------------------------------------------------------- constants


def test_the_window_is_the_protocols_and_streaming_still_exports_it():
    assert (WINDOW, WINDOW_BYTES) == (P.STREAM_WINDOW, P.STREAM_BYTES)
    assert (streaming.WINDOW, streaming.WINDOW_BYTES) == (WINDOW, WINDOW_BYTES)
    assert (SendWindow().upto, ReceiveWindow().credited) == (WINDOW, WINDOW)


# ---------------------------------------------------------------- the sender


def test_a_sender_runs_one_window_ahead_with_seqs_from_zero_then_waits():
    window = SendWindow(W, B)
    assert fill(window) == [0, 1, 2, 3]
    assert not window.may_send()


def test_a_credit_moves_the_window_on_and_a_stale_or_repeated_one_changes_nothing():
    window = SendWindow(W, B)
    fill(window)
    assert window.granted(W + 2) is True
    assert fill(window) == [4, 5]
    assert window.granted(W + 2) is False  # repeated
    assert window.granted(W + 1) is False  # stale: credits can cross on the way
    assert (window.upto, window.may_send()) == (W + 2, False)


def test_sending_beyond_the_window_raises():
    window = SendWindow(W, B)
    fill(window)
    with pytest.raises(RuntimeError, match="may_send"):
        window.sent(1)


def test_the_byte_budget_stops_the_sender_while_that_much_is_unread():
    window = SendWindow(W, B)
    assert window.sent(60) == 0
    assert window.may_send()  # 60 < 100 unread
    assert window.sent(40) == 1
    assert (window.unread, window.may_send()) == (100, False)  # a free seq, but the bytes are unread


def test_an_object_larger_than_the_budget_goes_alone():
    window = SendWindow(W, B)
    assert window.may_send()
    window.sent(5 * B)  # nothing unread: it goes
    assert not window.may_send()  # and nothing after it until it was taken
    window.granted(1 + W)  # the receiver took item 0
    assert (window.unread, window.may_send()) == (0, True)


def test_a_larger_object_still_goes_while_less_than_the_budget_is_unread():
    # May-send does not look at the next object's size: waiting for room for it
    # behind small unread items could wait for a credit the receiver never sends.
    window = SendWindow(W, B)
    window.sent(10)
    assert window.may_send()
    window.sent(5 * B)
    assert (window.unread, window.may_send()) == (10 + 5 * B, False)


def test_a_credit_frees_the_bytes_of_the_items_it_says_were_taken():
    window = SendWindow(W, B)
    for size in (30, 30, 40):
        window.sent(size)
    assert not window.may_send()
    assert window.granted(1 + W)  # upto - window = 1: item 0 was taken
    assert window.unread == 70
    assert window.may_send()
    window.sent(10)
    assert window.granted(3 + W)  # items 1 and 2 too
    assert window.unread == 10
    assert window.granted(100 + W)  # never frees more than was sent
    assert window.unread == 0


# ---------------------------------------------------------------- the receiver


def test_items_in_order_are_new_and_repeats_are_dropped():
    window = ReceiveWindow(W, B)
    assert [window.arrived(s) for s in (0, 1, 0, 1, 2)] == [
        Arrival.NEW, Arrival.NEW, Arrival.REPEAT, Arrival.REPEAT, Arrival.NEW]
    assert window.next_seq == 3


def test_an_item_beyond_the_next_is_a_gap_and_the_stream_stays_broken():
    window = ReceiveWindow(W, B)
    assert window.arrived(0) is Arrival.NEW
    assert window.arrived(2) is Arrival.GAP  # item 1 was lost
    assert window.broken
    assert window.arrived(1) is Arrival.GAP  # late: nothing after a loss is delivered
    assert window.arrived(3) is Arrival.GAP
    assert window.arrived(0) is Arrival.REPEAT
    assert window.next_seq == 1


def test_credit_is_granted_every_half_window_taken():
    window = ReceiveWindow(W, B)
    for seq in range(8):
        window.arrived(seq)
    assert [window.taken(1) for _ in range(8)] == [None, W + 2, None, W + 4, None, W + 6, None, W + 8]
    assert window.credited == W + 8


def test_credit_is_granted_every_quarter_budget_taken():
    window = ReceiveWindow(W, B)
    for seq in range(3):
        window.arrived(seq)
    assert window.taken(B // 4 - 1) is None
    assert window.taken(1) == 2 + W  # a quarter budget, before half a window
    assert window.taken(1) is None  # the bytes count again from the credit


def test_discarding_many_items_at_once_grants_one_credit_for_all():
    window = ReceiveWindow(W, B)
    for seq in range(3):
        window.arrived(seq)
    assert window.taken(3, count=3) == 3 + W
    assert window.taken(0, count=0) is None


def test_taking_more_items_than_arrived_raises():
    window = ReceiveWindow(W, B)
    window.arrived(0)
    window.taken(1)
    with pytest.raises(RuntimeError, match="arrived"):
        window.taken(1)


def test_the_real_window_credits_every_128_items_or_2_mib():
    window = ReceiveWindow()
    for seq in range(WINDOW):
        window.arrived(seq)
    credits = [window.taken(10) for _ in range(WINDOW)]
    assert [c for c in credits if c is not None] == [WINDOW + WINDOW // 2, 2 * WINDOW]
    window.arrived(WINDOW)
    assert window.taken(WINDOW_BYTES // 4) == 2 * WINDOW + 1


# ---------------------------------------------------------------- both ends together


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 3 * B), min_size=1, max_size=60),
       takes=st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_a_sender_and_its_receiver_stay_within_the_window_and_never_stall(sizes, takes):
    """The sender sends while it may; the receiver takes a few items per round; credits cross back."""
    sender, receiver = SendWindow(W, B), ReceiveWindow(W, B)
    queue: collections.deque[int] = collections.deque()  # items sent, not yet taken
    todo = collections.deque(sizes)
    rounds = 0
    while todo or queue:
        while todo and sender.may_send():
            size = todo.popleft()
            assert receiver.arrived(sender.sent(size)) is Arrival.NEW
            queue.append(size)
        assert sender.next_seq - receiver.taken_items <= W
        assert sender.unread <= B + max(sizes)  # the budget, plus one object
        assert sender.unread >= sum(queue)  # credits lag: never freed before taken
        if todo and not sender.may_send():
            assert queue, "the sender waits for credit, and the receiver has nothing to take"
        # Take a few, at least one when the sender waits (else this would be a deadlock).
        n = min(len(queue), max(takes[rounds % len(takes)], 0 if sender.may_send() and todo else 1))
        for _ in range(n):
            upto = receiver.taken(queue.popleft())
            if upto is not None:
                sender.granted(upto)
        rounds += 1
        assert rounds < 10 * len(sizes) + 10, "the stream stalled"
    assert receiver.taken_items == sender.next_seq == len(sizes)


def test_when_the_receiver_took_everything_the_sender_may_send_again():
    # For any sizes: no deadlock between a budget-full sender and a receiver that credits lazily.
    for sizes in ([B // 4 - 1] * 5, [1, 5 * B], [B - 1, 1, B], [B // 2] * 3):
        sender, receiver = SendWindow(W, B), ReceiveWindow(W, B)
        for size in sizes:
            if not sender.may_send():
                break
            receiver.arrived(sender.sent(size))
        credits = [receiver.taken(size) for size in sizes[: receiver.next_seq]]
        for upto in credits:
            if upto is not None:
                sender.granted(upto)
        assert sender.may_send(), sizes


# ---------------------------------------------------------------- the producer's StreamState


def state() -> tuple[streaming.StreamState, list[Any], concurrent.futures.Future[Any]]:
    feeds: list[Any] = []
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    return streaming.StreamState(fut, 7, feeds.append), feeds, fut


def test_the_producer_grants_credit_as_items_are_taken_and_drops_repeats():
    st_, feeds, _ = state()
    for seq in range(WINDOW // 2):
        assert st_.arrived([P.ItemEntry(7, seq, serialize.dumps(seq))]) is None
    assert st_.arrived([P.ItemEntry(7, 0, serialize.dumps("again"))]) is None  # a repeat: not queued again
    assert len(st_.items) == WINDOW // 2 and st_.exchanged
    assert [st_.take(timeout=0) for _ in range(WINDOW // 2)] == list(range(WINDOW // 2))
    assert feeds == [("credit", 7, WINDOW + WINDOW // 2)]


def test_the_producer_reports_a_gap_as_a_loss():
    st_, _, _ = state()
    assert st_.arrived([P.ItemEntry(7, 0, [b"x"])]) is None
    assert st_.arrived([P.ItemEntry(7, 2, [b"x"])]) == ("lost", 2)
    assert st_.next_seq == 1


def test_discarding_credits_what_waits_and_what_comes():
    st_, feeds, _ = state()
    for seq in range(WINDOW // 2 - 1):
        st_.arrived([P.ItemEntry(7, seq, [b"x"])])
    st_.discard()
    assert not st_.items and feeds == []
    st_.arrived([P.ItemEntry(7, WINDOW // 2 - 1, [b"x"])])  # discarded as it comes
    assert not st_.items and feeds == [("credit", 7, WINDOW + WINDOW // 2)]


def test_the_producer_waits_at_a_full_window_until_the_task_grants_credit():
    st_, feeds, _ = state()
    for i in range(WINDOW):
        st_.send(i, timeout=0)
    assert [op[2] for op in feeds] == list(range(WINDOW))
    with pytest.raises(TimeoutError):
        st_.send("one too many", timeout=0)
    st_.granted(WINDOW + 1)
    st_.send("now it goes", timeout=0)
    assert feeds[-1][:3] == ("item", 7, WINDOW)


def test_a_stream_whose_task_ended_says_so():
    st_, _, fut = state()
    fut.set_result(None)
    with pytest.raises(EOFError):
        st_.take(timeout=0)
    with pytest.raises(EOFError):
        st_.send("late", timeout=0)


def test_a_run_of_items_arrives_at_once_and_keeps_what_came_before_a_gap():
    st_, _, _ = state()
    woken: list[int] = []
    st_.add_callback(lambda: woken.append(len(st_.items)))
    run = [P.ItemEntry(7, seq, serialize.dumps(seq)) for seq in range(100)]
    assert st_.arrived(run) is None
    assert woken == [100] * 100  # queued together; a ready callback still runs once an item
    assert st_.arrived(run[:10]) is None and len(st_.items) == 100  # repeats dropped
    assert st_.arrived([P.ItemEntry(7, 100, [b"x"]), P.ItemEntry(7, 102, [b"y"])]) == ("lost", 102)
    assert st_.next_seq == 101


def test_a_stream_iterator_takes_runs_and_keeps_none_from_other_readers():
    st_, _, fut = state()
    n = streaming.RUN + 10
    st_.arrived([P.ItemEntry(7, seq, serialize.dumps(seq)) for seq in range(n)])
    first = st_.iterate(timeout=0)
    assert [next(first) for _ in range(3)] == [0, 1, 2]
    assert st_.take(timeout=0) == 3  # the next one, though the iterator moved a run out of the queue
    assert next(first) == 4
    first.close()
    fut.set_result(None)
    assert list(st_.iterate(timeout=0)) == list(range(5, n))
    assert st_.inbound.taken_items == n


def test_a_stream_iterator_credits_only_what_was_read():
    st_, feeds, _ = state()
    st_.arrived([P.ItemEntry(7, seq, serialize.dumps(seq)) for seq in range(WINDOW)])
    items = st_.iterate(timeout=0)
    read = [next(items) for _ in range(WINDOW // 2 + 1)]
    assert read == list(range(WINDOW // 2 + 1))
    # Credit comes by whole runs, never for an item still unread: the task stays at most WINDOW ahead.
    assert all(op[2] <= st_.inbound.taken_items + WINDOW for op in feeds)
    assert st_.inbound.taken_items <= len(read)
    rest = [next(items) for _ in range(WINDOW - len(read))]
    with pytest.raises(TimeoutError):
        next(items)  # waits (timeout 0) for more: everything read is credited first
    assert rest[-1] == WINDOW - 1 and st_.inbound.taken_items == WINDOW
    assert feeds[-1] == ("credit", 7, 2 * WINDOW)
