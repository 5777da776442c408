"""zpar.Executor and its futures do what ProcessPoolExecutor's do, observed side by side.

The stdlib's behaviour is not assumed: the ``stdlib`` fixture runs the same
cases through ``ProcessPoolExecutor`` in a child interpreter (a fresh process,
so its pool forks no threads of ours) and each test holds zpar to what it saw.
Where zpar keeps a better behaviour (a lost worker does not break the
executor; an argument that does not pickle fails at ``submit``), the test says
so, and so does README's concurrent.futures section.
"""

from __future__ import annotations

import builtins
import concurrent.futures as cf
import gc
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import cloudpickle
import pytest
import tasks

import zpar
from zpar import protocol as P
from zpar import serialize
from zpar.errors import InitializerError, UnpicklingError
from zpar.executor import Executor
from zpar.testing import wait_for
from zpar.testing.transport import StubBroker

# The functions below travel by value, as a script's would (tasks.py is registered by conftest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Box:
    """A result or an object that takes weak references."""

    def __init__(self, n):
        self.n = n

    def get(self, x):
        return x


def box(i):
    return Box(i)


def raise_named(name):
    raise getattr(builtins, name)(name)


class UnpicklesBy:
    """Pickles in the worker; unpickling it raises ``name`` (SystemExit, say) in the producer."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return (raise_named, (self.name,))


def unpickles_by(name):
    return UnpicklesBy(name)


def closure_over(held):
    return lambda x: len(held.n) + x


def init_fails_once(path):
    """An initializer that raises in the first worker to run it, and works in the others."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    raise RuntimeError("the initializer failed")


def freed(ref):
    gc.collect()
    return ref() is None


def stdlib_repr(text):
    return re.sub(r"0x[0-9a-f]+", "0x...", text)


# ---------------------------------------------------------------------- the stdlib, observed

STDLIB_PROBE = textwrap.dedent('''
    import builtins, concurrent.futures as cf, gc, json, os, pickle, threading, time, weakref
    from concurrent.futures.process import BrokenProcessPool

    class Box:
        def __init__(self, n):
            self.n = n
        def get(self, x):
            return x

    def box(i):
        return Box(i)

    def raise_named(name):
        raise getattr(builtins, name)(name)

    def os_exit(code):
        os._exit(code)

    def failing_init():
        raise RuntimeError("the initializer failed")

    def identity(x):
        return x

    def return_lock():
        return threading.Lock()

    def freed(ref):
        deadline = time.monotonic() + 10
        while ref() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        return ref() is None

    def error(call):
        try:
            call()
        except BaseException as exc:
            return {"type": type(exc).__name__, "message": str(exc),
                    "broken_process_pool": isinstance(exc, BrokenProcessPool),
                    "type_error": isinstance(exc, TypeError), "pickling_error": isinstance(exc, pickle.PicklingError)}
        return None

    if __name__ == "__main__":
        seen = {}
        with cf.ProcessPoolExecutor(2) as ex:
            results = ex.map(box, range(4))
            first = next(results)
            ref = weakref.ref(first)
            del first
            seen["map_frees_results"] = freed(ref)
            list(results)
            obj = Box(0)
            ref = weakref.ref(obj)
            fut = ex.submit(obj.get, 1)
            fut.result()
            del obj, fut
            seen["bound_method_freed"] = freed(ref)
            for name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
                seen[name] = error(ex.submit(raise_named, name).result)
            lock = threading.Lock()
            seen["unpicklable_argument"] = error(lambda: ex.submit(identity, lock).result())
            seen["unpicklable_result"] = error(ex.submit(return_lock).result)
        seen["submit_after_shutdown"] = error(lambda: ex.submit(identity, 1))
        with cf.ProcessPoolExecutor(1) as ex:
            seen["worker_died"] = error(ex.submit(os_exit, 3).result)
        with cf.ProcessPoolExecutor(1, initializer=failing_init) as ex:
            seen["initializer_failed"] = error(ex.submit(identity, 1).result)
            seen["submit_once_broken"] = error(lambda: ex.submit(identity, 1))
        print(json.dumps(seen))
''')


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    """What ProcessPoolExecutor did with each case, run in a child interpreter (its processes end with it)."""
    cwd = tmp_path_factory.mktemp("stdlib")
    proc = subprocess.run([sys.executable, "-c", STDLIB_PROBE], capture_output=True, text=True, timeout=50, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------- zpar, on both topologies


def _caught(exc, clause):
    try:
        raise exc
    except clause:
        return True
    except BaseException:  # noqa: BLE001 - the clause missed it: that is the answer
        return False


# ---------------------------------------------------------------------- 1. map frees what it yielded


@pytest.mark.parametrize("chunksize,timeout", [(1, None), (1, 30), (3, None), (3, 30)])
def test_map_frees_each_result_once_it_is_yielded(executor, stdlib, chunksize, timeout):
    assert stdlib["map_frees_results"]
    results = executor.map(box, range(7), chunksize=chunksize, timeout=timeout)
    for i in range(7):
        value = next(results)
        assert value.n == i
        ref = weakref.ref(value)
        del value
        wait_for(lambda ref=ref: freed(ref), 10, what=f"result {i} freed once the consumer dropped it")
    assert list(results) == []


# ---------------------------------------------------------------------- 2. the function cache holds nothing alive


def test_a_submitted_bound_method_and_its_object_are_freed_once_done(executor, stdlib):
    assert stdlib["bound_method_freed"]
    obj = Box(bytearray(1 << 20))
    ref = weakref.ref(obj)
    fut = executor.submit(obj.get, 1)
    assert fut.result(timeout=10) == 1
    del obj, fut
    wait_for(lambda: freed(ref), 10, what="the object of the submitted method freed")


def test_a_lambda_or_a_closure_holding_a_big_object_is_freed_once_done(executor):
    big = Box(bytearray(1 << 20))
    refs = [weakref.ref(big)]
    closure = closure_over(big)
    refs.append(weakref.ref(closure))
    assert executor.submit(closure, 1).result(timeout=10) == (1 << 20) + 1
    assert list(executor.map(closure, [1, 2], chunksize=2)) == [(1 << 20) + 1, (1 << 20) + 2]
    del big, closure
    wait_for(lambda: all(freed(r) for r in refs), 10, what="the closure and what it held freed")


def test_methods_wrapped_for_an_initializer_or_a_chunked_map_are_freed_too(address):
    with Executor(2, address, initializer=tasks.noop) as ex:
        obj = Box(0)
        ref = weakref.ref(obj)
        assert ex.submit(obj.get, 1).result(timeout=10) == 1  # a Call wrapper around the method
        assert list(ex.map(obj.get, range(5), chunksize=2)) == list(range(5))  # a Chunk wrapper
        del obj
        wait_for(lambda: freed(ref), 10, what="the wrapped method's object freed")


def test_a_plain_function_is_still_pickled_once_per_client(address, monkeypatch):
    pickled = []
    dump = serialize.dump_function
    monkeypatch.setattr(serialize, "dump_function", lambda fn: pickled.append(fn) or dump(fn))
    with Executor(2, address, initializer=tasks.noop) as ex:
        fn = lambda x: x + 1  # noqa: E731 - a new function object: nothing cached for it yet
        assert [f.result(timeout=10) for f in [ex.submit(fn, i) for i in range(50)]] == list(range(1, 51))
        assert len(pickled) == 1
        for _ in range(3):
            assert list(ex.map(fn, range(6), chunksize=2)) == list(range(1, 7))
        assert len(pickled) == 2  # and once more for its chunks


# ---------------------------------------------------------------------- 3. work pending at exit


EXIT_SCRIPT = textwrap.dedent('''
    import sys, time
    {imports}

    def write(path):
        time.sleep(0.5)  # so that it is still pending when the main thread ends
        with open(path, "w") as fh:
            fh.write("ran")

    def submit_and_drop(path):
        {make}.submit(write, path)  # the executor itself is not kept

    def submit_again(fut):  # runs once the interpreter is exiting: submits are refused by then
        try:
            executor.submit(write, sys.argv[1] + "-late")
        except RuntimeError as exc:
            with open(sys.argv[1] + "-refused", "w") as fh:
                fh.write(str(exc))

    if __name__ == "__main__":
        submit_and_drop(sys.argv[2])
        executor = {make}
        executor.submit(write, sys.argv[1]).add_done_callback(submit_again)  # the last line: no shutdown
''')


@pytest.mark.parametrize("kind", ["stdlib", "zpar"])
def test_a_task_pending_when_the_interpreter_exits_still_runs(tmp_path, kind):
    imports, make = {"stdlib": ("import concurrent.futures", "concurrent.futures.ProcessPoolExecutor(1)"),
                     "zpar": ("import zpar", "zpar.Executor(1)")}[kind]
    script = tmp_path / "script.py"
    script.write_text(EXIT_SCRIPT.format(imports=imports, make=make))
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    proc = subprocess.run([sys.executable, str(script), str(kept), str(dropped)], capture_output=True, text=True,
                          timeout=50, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert kept.read_text() == "ran" and dropped.read_text() == "ran"
    refused = tmp_path / "kept-refused"
    assert refused.read_text() == "cannot schedule new futures after shutdown"  # the stdlib's executors shut down


CLIENT_EXIT_SCRIPT = textwrap.dedent('''
    import sys, time
    import zpar

    def slow(path):
        time.sleep(40)
        with open(path, "w") as fh:
            fh.write("ran")

    if __name__ == "__main__":
        client = zpar.Client(workers=1)
        client.submit(slow, sys.argv[1])
        client.submit(slow, sys.argv[1])
''')


def test_a_client_left_open_at_exit_cancels_its_pending_tasks_instead_of_waiting(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(CLIENT_EXIT_SCRIPT)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ran")], capture_output=True, text=True,
                          timeout=50, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30  # a wait would take 40 s or more
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------- 4. submit after shutdown


def test_submit_after_shutdown_says_what_the_stdlib_says(address, stdlib):
    ex = Executor(1, address)
    ex.shutdown()
    with pytest.raises(RuntimeError) as info:
        ex.submit(tasks.square, 2)
    assert str(info.value) == stdlib["submit_after_shutdown"]["message"]


def test_submit_to_a_closed_client_says_it_in_the_stdlib_s_words_too(cluster):
    client = cluster.client()
    client.close()
    with pytest.raises(RuntimeError, match=r"^cannot schedule new futures after shutdown: .*create a new one"):
        client.submit(tasks.square, 2)


# ---------------------------------------------------------------------- 5. nothing in decoding stops the I/O thread


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "ValueError"])
def test_a_result_that_raises_anything_while_unpickled_fails_its_future_only(client, name):
    fut = client.submit(unpickles_by, name)
    with pytest.raises(UnpicklingError, match=rf"result of task \d+: {name}") as info:
        fut.result(timeout=10)
    assert type(info.value.__cause__).__name__ == name
    assert _caught(info.value, pickle.UnpicklingError) and _caught(info.value, zpar.SerializationError)
    assert client._io.is_alive()
    assert client.submit(tasks.square, 7).result(timeout=10) == 49


def test_a_done_callback_raising_system_exit_does_not_stop_the_producer():
    broker = StubBroker()
    broker.welcome()
    first, second = broker.submit(tasks.square, 2), broker.submit(tasks.square, 3)
    first.add_done_callback(lambda fut: sys.exit("from a callback"))
    (a, b) = broker.tasks()
    broker.send(P.Result((P.ResultEntry(a.id, P.Status.OK, [pickle.dumps(UnpicklesBy("SystemExit"))]),
                          P.ResultEntry(b.id, P.Status.OK, serialize.dumps(9)))))
    assert isinstance(first.exception(0), UnpicklingError) and second.result(0) == 9
    third = broker.submit(tasks.square, 4)
    (c,) = broker.tasks()
    broker.result(c.id, 16)
    assert third.result(0) == 16 and broker.released == 3


# ---------------------------------------------------------------------- 6. the stdlib's except clauses


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
def test_a_task_raising_a_base_exception_raises_it_as_itself_and_the_worker_goes_on(executor, stdlib, name):
    assert stdlib[name]["type"] == name
    fut = executor.submit(raise_named, name)
    with pytest.raises(getattr(builtins, name)) as info:
        fut.result(timeout=10)
    assert type(info.value).__name__ == name and info.value.args == (name,)
    assert type(fut.exception(0)) is type(info.value)
    assert isinstance(info.value.__cause__, zpar.RemoteTraceback) and name in info.value.remote_traceback
    assert stdlib_repr(repr(fut)) == f"<Future at 0x... state=finished raised {name}>"
    assert executor.submit(tasks.square, 5).result(timeout=10) == 25


def test_a_lost_worker_is_caught_by_except_broken_process_pool_and_the_executor_goes_on(stdlib):
    assert stdlib["worker_died"]["broken_process_pool"]
    with Executor(1, retries=0) as ex:
        with pytest.raises(BrokenProcessPool) as info:
            ex.submit(tasks.os_exit, 3).result(timeout=20)
        assert isinstance(info.value, zpar.WorkerLost) and info.value.exitcode == 3
        assert _caught(info.value, cf.BrokenExecutor)
        assert ex.submit(tasks.square, 3).result(timeout=20) == 9  # unlike a process pool: not broken


def test_what_does_not_pickle_is_caught_by_the_stdlib_s_clauses_for_it(executor, stdlib):
    assert stdlib["unpicklable_argument"]["type_error"] and stdlib["unpicklable_result"]["type_error"]
    with pytest.raises(zpar.SerializationError) as at_submit:  # at submit: the stdlib waits for result()
        executor.submit(tasks.identity, threading.Lock())
    with pytest.raises(zpar.SerializationError) as at_result:
        executor.submit(tasks.return_lock).result(timeout=10)
    for err in (at_submit.value, at_result.value):
        assert _caught(err, TypeError) and _caught(err, pickle.PicklingError)


def test_a_failing_initializer_breaks_the_executor_as_the_stdlib_s(tmp_path, stdlib, gate):
    assert stdlib["initializer_failed"]["broken_process_pool"] and stdlib["submit_once_broken"]["broken_process_pool"]
    with Executor(2, initializer=init_fails_once, initargs=(str(tmp_path / "failed"),)) as ex:
        futures = [ex.submit(tasks.block_until, gate) for _ in range(4)]
        for fut in futures:  # one failed in its initializer; the others, running or queued, with it
            with pytest.raises(BrokenProcessPool) as info:
                fut.result(timeout=20)
            assert isinstance(info.value, InitializerError)
            assert "the initializer failed" in str(info.value) + str(info.value.__cause__)
        with pytest.raises(BrokenProcessPool, match="init_fails_once raised RuntimeError"):
            ex.submit(tasks.square, 2)
        with pytest.raises(BrokenProcessPool):
            ex.map(tasks.square, range(3))
        assert "broken" in repr(ex)


# ---------------------------------------------------------------------- 7. repr and the states of cancel


def test_future_repr_is_the_stdlib_s(executor, gate):
    def like(state, value=None, exc=None):
        fut = cf.Future()
        if state == "finished":
            fut.set_exception(exc) if exc is not None else fut.set_result(value)
        elif state == "cancelled":
            fut.cancel()
        return stdlib_repr(repr(fut))

    pending = executor.submit(tasks.block_until, gate)
    assert stdlib_repr(repr(pending)) == like("pending") == "<Future at 0x... state=pending>"
    assert re.fullmatch(r"<Future at 0x[0-9a-f]+ state=pending>", repr(pending))
    returned = executor.submit(tasks.square, 2)
    returned.result(timeout=10)
    assert stdlib_repr(repr(returned)) == like("finished", 4) == "<Future at 0x... state=finished returned int>"
    raised = executor.submit(tasks.raise_value_error, "x")
    raised.exception(timeout=10)
    assert stdlib_repr(repr(raised)) == like("finished", exc=ValueError()) == \
        "<Future at 0x... state=finished raised ValueError>"
    assert pending.cancel()
    assert stdlib_repr(repr(pending)) == like("cancelled") == "<Future at 0x... state=cancelled>"


def test_cancel_moves_through_cancelled_then_cancelled_and_notified_as_with_the_stdlib():
    # The stdlib's: cancel() makes it CANCELLED; its executor notifies waiters when it takes the work.
    stdlib_future = cf.Future()
    broker = StubBroker()
    broker.welcome()
    ours = broker.submit(tasks.square, 2)
    for fut, executor_takes_it in ((stdlib_future, stdlib_future.set_running_or_notify_cancel),
                                   (ours, broker.turn)):  # zpar's executor: the client's I/O thread
        assert fut.cancel() and fut._state == "CANCELLED" and fut.cancelled() and fut.done()
        assert cf.wait([fut], timeout=0).not_done == {fut}  # not yet, for wait and as_completed
        executor_takes_it()
        assert fut._state == "CANCELLED_AND_NOTIFIED"
        assert cf.wait([fut], timeout=0).done == {fut}
        assert list(cf.as_completed([fut], timeout=0)) == [fut]


def test_cancelled_futures_are_done_for_wait_and_as_completed_once_the_client_took_the_cancel(executor, gate):
    futures = [executor.submit(tasks.block_until, gate) for _ in range(6)]
    assert all(f.cancel() for f in futures)
    done, not_done = cf.wait(futures, timeout=10)
    assert done == set(futures) and not not_done
    assert set(cf.as_completed(futures, timeout=10)) == set(futures)
    assert all(f._state == "CANCELLED_AND_NOTIFIED" for f in futures)


def test_a_future_cancelled_as_its_result_arrives_is_still_notified():
    broker = StubBroker()
    broker.welcome()
    fut = broker.submit(tasks.square, 2)
    (task,) = broker.tasks()
    fut.cancel()  # the result comes in before the I/O thread takes the cancel
    broker.core.received(broker.now, P.Result((P.ResultEntry(task.id, P.Status.OK, serialize.dumps(4)),)))
    assert fut._state == "CANCELLED_AND_NOTIFIED" and broker.released == 1
    broker.turn()  # the cancel, late: nothing more happens
    assert fut._state == "CANCELLED_AND_NOTIFIED" and broker.released == 1
