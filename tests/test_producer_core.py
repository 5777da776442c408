"""The producer's core (zpar._producer) with a stub broker and a fake clock: no sockets, no sleeps.

Every message crosses zpar.protocol both ways (zpar.testing.transport); the
clock moves only with ``broker.advance``. The default broker beats every
1 s with liveness 3, so the producer judges it silent after 2 x 3 s.
"""

from __future__ import annotations

import concurrent.futures
import signal

import pytest

import zpar
from zpar import protocol as P
from zpar._producer import Link
from zpar.options import TaskOptions
from zpar.testing.transport import StubBroker


def square(x):
    return x * x


def cube(x):
    return x ** 3


def echo(channel):
    for obj in channel:
        channel.send(obj)


def resolutions(fut):
    """A list that grows by one each time ``fut`` is resolved."""
    seen = []
    fut.add_done_callback(seen.append)
    return seen


def kinds(messages):
    return [type(m) for m in messages]


@pytest.fixture
def broker():
    """A producer connected to a stub broker at t=0, its HELLO and the heartbeat at t=0 taken."""
    stub = StubBroker()
    stub.welcome()
    stub.advance(0.0)
    stub.take()
    return stub


# ---------------------------------------------------------------------- submitting


def test_tasks_handed_over_together_go_in_one_submit_with_each_function_blob_once(broker):
    futures = [broker.submit(square, i, hold=True) for i in range(3)] + [broker.submit(cube, 2, hold=True)]
    broker.turn()
    (submit,) = broker.take(P.Submit)
    assert [t.id for t in submit.tasks] == [f.task_id for f in futures]
    assert sorted(f.digest for f in submit.funcs) == sorted({t.digest for t in submit.tasks})
    broker.submit(square, 9)
    (again,) = broker.take(P.Submit)
    assert again.funcs == (), "the broker has that blob already"


def test_a_pile_of_tasks_is_split_into_submits_that_fit_with_the_blob_in_the_first(broker):
    for i in range(P.BATCH_MAX_TASKS + 10):
        broker.submit(square, i, hold=True)
    broker.turn()
    submits = broker.take(P.Submit)
    assert [len(s.tasks) for s in submits] == [P.BATCH_MAX_TASKS, 10]
    assert [len(s.funcs) for s in submits] == [1, 0]


def test_tasks_handed_over_before_the_first_welcome_go_with_it():
    broker = StubBroker()
    fut = broker.submit(square, 4)
    assert broker.tasks() == [], "not connected yet"
    broker.welcome()
    (task,) = broker.tasks()
    broker.result(task.id, 16)
    assert fut.result(0) == 16


def test_the_window_slot_of_each_task_is_given_back_once_however_it_ends(broker):
    done, failed, cancelled, raced = (broker.submit(square, i) for i in range(4))
    early = broker.submit(square, 5, hold=True)
    broker.tasks()
    broker.result(done.task_id, 0)
    broker.result(done.task_id, 0)  # a duplicate
    broker.ended(failed.task_id, P.Status.LOST)
    cancelled.cancel()
    broker.turn()
    broker.result(cancelled.task_id, 4)  # it had finished before the cancel reached it
    raced.cancel()  # the user cancels; its result comes in before the I/O thread takes the cancel
    broker.result(raced.task_id, 9)
    early.cancel()
    broker.turn()
    assert broker.released == 5 and not broker.core.pending
    assert done.result(0) == 0 and cancelled.cancelled() and raced.cancelled() and early.cancelled()


# ---------------------------------------------------------------------- the broker's liveness and restarts


def test_a_connected_producer_beats_every_heartbeat_and_a_connecting_one_says_hello():
    broker = StubBroker(heartbeat=0.25)
    broker.take()
    assert kinds(broker.advance(2.0)) == [P.Hello] * 2  # t = 1, 2 (the first went at start): one a second
    broker.welcome()
    assert kinds(broker.advance(1.0)) == [P.Heartbeat] * 4  # the broker's own interval from then on


def test_a_broker_silent_past_twice_its_liveness_is_left_and_every_unfinished_task_goes_again(broker):
    futures = [broker.submit(square, i) for i in range(3)]
    first = broker.tasks()
    broker.result(first[0].id, 0)
    seen = [resolutions(f) for f in futures]
    assert set(kinds(broker.advance(6.0))) == {P.Heartbeat}
    assert broker.core.link is Link.CONNECTED, "silent for 6 s: within 2 x 3 s"
    assert kinds(broker.advance(1.0)) == [P.Hello]
    assert broker.core.link is Link.CONNECTING
    broker.welcome("epoch-2")  # a restarted broker
    assert [t.id for t in broker.tasks()] == [first[1].id, first[2].id]
    assert first[1].digest in broker.funcs, "the blob went again to the new broker"
    for tid, value in ((first[1].id, 1), (first[1].id, 1), (first[2].id, 4), (first[0].id, 0)):
        broker.result(tid, value)  # the old broker's results and the new one's: duplicates
    assert [f.result(0) for f in futures] == [0, 1, 4]
    assert [len(s) for s in seen] == [1, 1, 1] and broker.released == 3


def test_a_message_that_does_not_decode_still_shows_the_broker_lives(broker):
    broker.advance(5.0)
    broker.core.heard(broker.now)
    broker.advance(5.0)
    assert broker.core.link is Link.CONNECTED


def test_a_second_welcome_from_the_same_broker_sends_nothing_again(broker):
    broker.submit(square, 1)
    broker.tasks()
    assert broker.welcome() == [] and broker.take() == []


def test_a_broker_saying_bye_is_waited_for_and_gets_the_unfinished_tasks_when_back(broker):
    broker.submit(square, 1)
    (task,) = broker.tasks()
    broker.send(P.Bye(P.ByeReason.STOPPING))
    assert broker.core.link is Link.CONNECTING
    assert kinds(broker.advance(1.0)) == [P.Hello]
    broker.welcome("epoch-2")
    assert [t.id for t in broker.tasks()] == [task.id]


def test_a_broker_away_past_broker_timeout_fails_pending_futures_with_broken_cluster():
    broker = StubBroker(broker_timeout=10.0)
    broker.welcome()
    fut = broker.submit(square, 2)
    broker.tasks()
    broker.advance(10.0)  # judged silent at t=7, away since t=0 (when it was last heard)
    assert not fut.done()
    broker.advance(1.0)
    exc = fut.exception(0)
    assert isinstance(exc, zpar.BrokenCluster) and isinstance(exc, concurrent.futures.BrokenExecutor)
    assert isinstance(exc, zpar.BrokerUnavailable) and "broker_timeout=10 s" in str(exc)
    assert broker.released == 1
    broker.welcome("epoch-2")  # it came back: new work runs
    later = broker.submit(square, 3)
    (task,) = broker.tasks()
    broker.result(task.id, 9)
    assert later.result(0) == 9


# ---------------------------------------------------------------------- the broker's errors


def test_an_unknown_peer_error_says_hello_again_and_the_welcome_brings_everything_unfinished(broker):
    broker.submit(square, 3)
    (task,) = broker.tasks()
    assert kinds(broker.error(P.ErrorCode.UNKNOWN_PEER)) == [P.Hello]
    assert broker.core.link is Link.CONNECTING
    broker.welcome("epoch-2")
    assert [t.id for t in broker.tasks()] == [task.id] and task.digest in broker.funcs


def test_an_unknown_function_error_sends_those_tasks_again_with_their_blob(broker):
    broker.submit(square, 3)
    broker.submit(square, 4)
    first, _ = broker.tasks()
    broker.error(P.ErrorCode.UNKNOWN_FUNCTION, first.id)
    (submit,) = broker.take(P.Submit)
    assert [t.id for t in submit.tasks] == [first.id]
    assert [f.digest for f in submit.funcs] == [first.digest]


def test_a_revoked_key_fails_every_future_with_authentication_error_and_ends_the_link(broker):
    futures = [broker.submit(square, i) for i in range(2)]
    queued = broker.submit(square, 9, hold=True)
    broker.error(P.ErrorCode.KEY_REVOKED)
    for fut in [*futures, queued]:
        exc = fut.exception(0)
        assert isinstance(exc, zpar.AuthenticationError) and isinstance(exc, PermissionError)
        assert "allow-list" in str(exc)
    assert broker.core.ended and broker.released == 2
    broker.take()
    assert broker.advance(10.0) == [] and broker.result(futures[0].task_id, 0) == []


def test_a_refused_handshake_fails_pending_futures_with_authentication_error():
    broker = StubBroker()
    fut = broker.submit(square, 2)
    broker.core.refused("the broker at tcp://x refused our key")
    assert isinstance(fut.exception(0), zpar.AuthenticationError)
    assert broker.core.ended and broker.released == 1


def test_a_task_the_broker_refuses_fails_with_protocol_error(broker):
    fut = broker.submit(square, 2)
    (task,) = broker.tasks()
    broker.error(P.ErrorCode.NOT_ALLOWED, task.id)
    with pytest.raises(zpar.ProtocolError, match=f"refused task {task.id}"):
        fut.result(0)


# ---------------------------------------------------------------------- how tasks end


def test_a_lost_task_fails_with_worker_lost_carrying_its_cause(broker):
    killed, exited = broker.submit(square, 1), broker.submit(square, 2)
    broker.tasks()
    broker.ended(killed.task_id, P.Status.LOST, P.Cause("node-a", 321, None, signal.SIGKILL, 4))
    broker.ended(exited.task_id, P.Status.LOST, P.Cause("node-b", 322, 3, None, 1))
    exc = killed.exception(0)
    assert type(exc) is zpar.WorkerLost
    assert (exc.node, exc.pid, exc.exitcode, exc.signal, exc.attempts) == ("node-a", 321, None, signal.SIGKILL, 4)
    assert "killed by SIGKILL" in str(exc) and "gave up after 4 attempts" in str(exc)
    assert "exited with code 3" in str(exited.exception(0)) and exited.exception(0).exitcode == 3


def test_a_task_over_the_memory_limit_fails_with_memory_limit_exceeded(broker):
    fut = broker.submit(square, 1)
    broker.tasks()
    broker.ended(fut.task_id, P.Status.MEMORY, P.Cause("node-a", 7, None, signal.SIGKILL, detail="used 2 GiB"))
    exc = fut.exception(0)
    assert isinstance(exc, zpar.MemoryLimitExceeded) and exc.node == "node-a" and "used 2 GiB" in str(exc)


def test_a_task_past_its_timeout_fails_with_task_timeout(broker):
    fut = broker.submit(square, 1)
    broker.tasks()
    broker.ended(fut.task_id, P.Status.TIMEOUT, P.Cause("node-a", 7, detail="ran past its timeout of 0.5 s"))
    exc = fut.exception(0)
    assert isinstance(exc, zpar.TaskTimeout) and isinstance(exc, concurrent.futures.TimeoutError)
    assert "timeout of 0.5 s" in str(exc)


def test_the_tasks_own_exception_comes_back_with_where_it_was_raised(broker):
    fut = broker.submit(square, 1, opts=TaskOptions(retry_on=(ConnectionError,)))
    broker.tasks()
    broker.raised(fut.task_id, ValueError("no such thing"))
    with pytest.raises(ValueError, match="no such thing") as info:
        fut.result(0)
    assert info.value.host == "stub-host" and "ValueError" in info.value.remote_traceback
    assert broker.tasks() == [], "not one of its retry_on: not run again"


def test_a_task_raising_one_of_its_retry_on_runs_again_within_its_retries(broker):
    fut = broker.submit(square, 3, opts=TaskOptions(retries=2, retry_on=(ConnectionError,)))
    (task,) = broker.tasks()
    for n in (1, 2):
        broker.raised(task.id, ConnectionError(f"flaky {n}"))
        assert [t.id for t in broker.tasks()] == [task.id] and not fut.done()
    broker.raised(task.id, ConnectionError("flaky 3"))
    assert broker.tasks() == []
    with pytest.raises(ConnectionError, match="flaky 3"):
        fut.result(0)
    assert broker.released == 1


def test_a_result_that_does_not_unpickle_fails_its_future_naming_it(broker):
    fut = broker.submit(square, 1)
    broker.tasks()
    broker.send(P.Result((P.ResultEntry(fut.task_id, P.Status.OK, (b"not a pickle",)),)))
    with pytest.raises(zpar.SerializationError, match=f"result of task {fut.task_id}"):
        fut.result(0)
    assert broker.released == 1


# ---------------------------------------------------------------------- cancel


def test_a_task_cancelled_before_it_was_handed_over_is_never_sent(broker):
    fut = broker.submit(square, 1, hold=True)
    assert fut.cancel()
    broker.turn()
    assert broker.take() == [] and broker.released == 1 and not broker.core.pending


def test_cancelling_sent_tasks_sends_cancel_forced_or_not(broker):
    plain, forced = broker.submit(square, 1), broker.submit(square, 2)
    broker.tasks()
    plain.cancel()
    forced.cancel(force=True)
    broker.turn()
    assert [(c.ids, c.force) for c in broker.take(P.Cancel)] == [((plain.task_id,), False),
                                                                  ((forced.task_id,), True)]


def test_a_task_cancelled_while_the_broker_is_away_is_not_sent_again(broker):
    fut = broker.submit(square, 1)
    broker.tasks()
    broker.error(P.ErrorCode.UNKNOWN_PEER)
    fut.cancel()
    broker.turn()
    assert broker.take(P.Cancel) == []
    broker.welcome("epoch-2")
    assert broker.tasks() == [] and broker.released == 1


def test_closing_cancels_every_open_future_and_says_bye(broker):
    sent, queued = broker.submit(square, 1), broker.submit(square, 2, hold=True)
    (bye,) = broker.close()
    assert bye == P.Bye(P.ByeReason.LEAVING)
    assert sent.cancelled() and queued.cancelled()
    assert broker.turn() == [], "no CANCEL queued for a link that ended"


def test_a_crashed_loop_fails_the_open_futures_with_its_error_instead_of_cancelling_them(broker):
    sent, queued = broker.submit(square, 1), broker.submit(square, 2, hold=True)
    broker.core.crashed(RuntimeError("the I/O thread broke"))
    broker.close()
    for fut in (sent, queued):
        with pytest.raises(RuntimeError, match="the I/O thread broke"):
            fut.result(0)


# ---------------------------------------------------------------------- streams


def test_after_a_broker_restart_a_stream_that_exchanged_items_fails_and_one_that_did_not_runs_again(broker):
    talked, quiet = broker.start(echo), broker.start(echo)
    broker.tasks()
    broker.items(talked.task_id, "a")
    broker.error(P.ErrorCode.UNKNOWN_PEER)
    broker.welcome("epoch-2")
    assert [t.id for t in broker.tasks()] == [quiet.task_id]
    assert [(c.ids, c.force) for c in broker.take(P.Cancel)] == [((talked.task_id,), True)]
    assert talked.receive(0) == "a"
    with pytest.raises(zpar.WorkerLost, match="not run again"):
        talked.receive(0)
    assert not quiet.done()


def test_an_item_lost_on_the_way_breaks_the_stream_and_stops_its_task(broker):
    fut = broker.start(echo)
    broker.tasks()
    broker.items(fut.task_id, "a")
    broker.items(fut.task_id, "c", seq=2)
    assert [(c.ids, c.force) for c in broker.take(P.Cancel)] == [((fut.task_id,), True)]
    assert fut.receive(0) == "a"
    with pytest.raises(zpar.WorkerLost, match=f"item 1 of task {fut.task_id} was lost"):
        fut.receive(0)
    assert broker.released == 1


def test_a_stream_ends_with_its_value_only_when_every_item_it_counted_arrived(broker):
    whole, short = broker.submit(square, 1), broker.submit(square, 2)
    broker.tasks()
    broker.items(whole.task_id, 0, 1)
    broker.items(short.task_id, 0)
    broker.streamed(whole.task_id, 2, "done")
    broker.streamed(short.task_id, 2, "done")
    assert list(whole.stream(timeout=0)) == [0, 1] and whole.result(0) == "done"
    with pytest.raises(zpar.WorkerLost, match="1 of the 2 items"):
        short.result(0)


def test_what_is_sent_to_a_task_goes_behind_its_submit(broker):
    fut = broker.start(echo, hold=True)
    fut.send("x")
    fut.close_input()
    out = broker.turn()
    assert kinds(out) == [P.Submit, P.Feed]
    feed = out[1]
    assert [(i.id, i.seq) for i in feed.items] == [(fut.task_id, 0)] and feed.closed == (fut.task_id,)


def test_a_task_sent_to_while_the_broker_was_away_fails_when_it_is_back(broker):
    fut = broker.start(echo)
    broker.tasks()
    broker.error(P.ErrorCode.UNKNOWN_PEER)
    fut.send("x")
    assert broker.turn() == [], "nothing goes while the broker is away"
    broker.welcome("epoch-2")
    assert broker.tasks() == []
    with pytest.raises(zpar.WorkerLost, match="in the middle of its stream"):
        fut.result(0)


def test_credits_from_the_task_let_the_producer_send_more(broker):
    fut = broker.start(echo)
    broker.tasks()
    for i in range(zpar.streaming.WINDOW):
        fut.send(i)
    with pytest.raises(TimeoutError):
        fut.send("one too many", timeout=0)
    broker.send(P.Items((), (P.Credit(fut.task_id, zpar.streaming.WINDOW + 1),)))
    fut.send("one more", timeout=0)


def test_a_release_of_more_objects_than_one_message_may_list_goes_in_several(broker):
    # Every message the peers decode lists at most MAX_ENTRIES digests (RELEASE, at each hop, is cut so).
    digests = [P.digest(b"%d" % i) for i in range(P.MAX_ENTRIES + 5)]
    msgs = broker.core.released(digests)
    assert [len(m.digests) for m in msgs] == [P.MAX_ENTRIES, 5]
    assert all(P.decode(P.encode(m)) == m for m in msgs)
