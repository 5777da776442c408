"""Task functions the tests send to workers.

Workers cannot import this module (they do not run from the tests directory),
so conftest registers it with ``cloudpickle.register_pickle_by_value``: every
function here travels by value, like a lambda. Keep it free of classes whose
instances are passed as *arguments*: plain pickle, tried first for arguments,
would reference them by module name.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import threading
import time


def square(x):
    return x * x


def add(a, b):
    return a + b


def identity(x):
    return x


def noop():
    return None


def tag(label, x):
    """``(label, x)``: which producer's input this result came from."""
    return label, x


def worker_pid(_=None):
    return os.getpid()


def sleep_square(x, seconds):
    time.sleep(seconds)
    return x * x


def block_until(gate, timeout=30.0, value=None):
    """Wait (in the worker) until the file ``gate`` exists: tests open it to release us."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.01)
    return value


def touch(path):
    """Leave evidence that this task ran."""
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    return path


def raise_value_error(message):
    raise ValueError(message)


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be unpickled: ``args`` has one item and ``__init__`` wants two."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_unpicklable_error():
    raise NeedsTwoArgs("left", "right")


def return_lock():
    return threading.Lock()


def die_at(x, poison, how):
    """``x * x``, except that input ``poison`` ends the worker: "exit3", "segv" or "kill"."""
    if x == poison:
        if how == "exit3":
            os._exit(3)
        if how == "segv":
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the working directory
            ctypes.string_at(0)
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def call_sys_exit(code):
    sys.exit(code)


def double(array):
    return array * 2


def hog_memory(mib, seconds=5.0):
    """Hold ``mib`` MiB (touched, so it is resident) for a while, then return how much."""
    block = bytearray(mib * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return len(block) >> 20


def logged_square(exec_dir, i, seconds=0.0):
    """``i * i``, its run logged in ``exec_dir`` for the ledger's executions histogram."""
    from zpar.testing.ledger import execution

    with execution(exec_dir, i):
        if seconds:
            time.sleep(seconds)
        return i * i


def die_once_then_sum(marker, array):
    """The first call (none has made the file ``marker``) kills its worker; a retry returns ``array``'s sum."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return float(array.sum())


def flaky(counter_path, failures, value):
    """Raise ConnectionError the first ``failures`` times (counted in a file), then return ``value``."""
    try:
        with open(counter_path) as fh:
            calls = int(fh.read() or 0)
    except FileNotFoundError:
        calls = 0
    with open(counter_path, "w") as fh:
        fh.write(str(calls + 1))
    if calls < failures:
        raise ConnectionError(f"flaky call {calls + 1}")
    return value


def _refuse_to_load():
    raise RuntimeError("this result cannot be loaded here")


class LoadsNowhere:
    """Pickles in the worker; unpickling it (in the producer) raises."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def return_loads_nowhere():
    return LoadsNowhere()


def where(_=None):
    """``(pid, thread id)``: which process and thread ran this call."""
    return os.getpid(), threading.get_ident()


def nested_joblib(n, backend=None):
    """A joblib ``Parallel(n_jobs=-1)`` of ``n`` calls to ``where`` inside this task.

    ``backend="zpar"`` asks for the zpar backend explicitly in here. Returns
    ``(where(), [where() of each inner call])``.
    """
    import contextlib
    import warnings

    import joblib

    if backend == "zpar":
        import zpar.joblib  # noqa: F401  (registers the backend in this worker)
    config = joblib.parallel_config(backend=backend) if backend else contextlib.nullcontext()
    with config, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backend's "runs sequentially" warning
        inner = joblib.Parallel(n_jobs=-1)(joblib.delayed(where)(i) for i in range(n))
    return where(), inner


# ---------------------------------------------------------------------- zpar.pprocess (test_pprocess.py)


def pp_gated(gate, x):
    """``x * x``; a negative ``x`` first leaves ``{gate}.{x}`` (it runs) and waits for the file ``gate``."""
    if x < 0:
        touch(f"{gate}.{x}")
        block_until(gate)
    return x * x


def pp_check(x):
    """``x``, or ValueError for "boom"."""
    if x == "boom":
        raise ValueError("boom at work")
    return x


def pp_rows(channel, i, n):
    """A channel-aware call: sends ``(i, j, i * n + j)`` for each j, as pprocess's continuous example does."""
    for j in range(n):
        channel.send((i, j, i * n + j))


def pp_echo(channel, limit):
    """Receives numbers until one reaches ``limit``, sends their sum back, then "Done"."""
    total = 0
    while (i := channel.receive()) < limit:
        total += i
    channel.send(total)
    channel.send("Done")


def pp_countdown(channel, data):
    """Sends ``data``, reads the reply, and so on until the reply is 0 (pprocess's two-way test)."""
    while data != 0:
        channel.send(data)
        data = channel.receive()


def pp_reusable(channel, *args, **kw):
    """A hand-written reusable call: answers ``add(*args)``, then each ``(args, kw)`` it is sent, until None.

    Each answer is ``(token, value)``, the token made once per call of this function.
    """
    import uuid

    token = uuid.uuid4().hex
    channel.send((token, add(*args, **kw)))
    while (more := channel.receive()) is not None:
        args, kw = more
        channel.send((token, add(*args, **kw)))


def pp_send_then_fail(channel, message):
    """Sends one message, then raises ValueError(message)."""
    channel.send("before")
    raise ValueError(message)


def pp_exit_early(channel):
    """Sends 1, ends the call with pprocess's exit(), and so never sends 2."""
    from zpar.pprocess import exit as pp_exit

    channel.send(1)
    pp_exit(channel)
    channel.send(2)


# ---------------------------------------------------------------------- Executor and Pool initializers


def init_mark(record, key, value):
    """An initializer: sets ``os.environ[key] = value`` in the worker and appends its pid to ``record``."""
    os.environ[key] = value
    with open(record, "a") as fh:
        fh.write(f"{os.getpid()}\n")


def env_of(key, _=None):
    """``(pid, os.environ.get(key))``: what this worker's initializer left."""
    return os.getpid(), os.environ.get(key)


def failing_init():
    raise RuntimeError("the initializer failed")


def raise_if_negative(x):
    """``x``, or ValueError for a negative ``x``."""
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


# zpar.pp (Parallel Python) jobs. `colorsys`, `osp` and `pp_undefined_helper` are deliberately
# not defined in this module: the tests give them through pp's `modules` and `depfuncs`.


def pp_uses_colorsys(r, g, b):
    return colorsys.rgb_to_hsv(r, g, b)  # noqa: F821


def pp_uses_osp(path):
    return osp.basename(path)  # noqa: F821


def pp_make_helper():
    """A function named ``pp_undefined_helper`` that this module's globals do not hold."""
    def pp_undefined_helper(x):
        return x * 10
    return pp_undefined_helper


def pp_calls_undefined_helper(x):
    return pp_undefined_helper(x) + 1  # noqa: F821


def pp_make_accumulator(total):
    """An instance of a local class (which travels by value) with a method to submit."""
    class Accumulator:
        def __init__(self, total):
            self.total = total

        def add(self, x):
            return self.total + x

    return Accumulator(total)


def pp_prints(x):
    print("job says", x)
    return x


# ---------------------------------------------------------------------- streams and channels (test_streaming.py)


def count_up(n, result="done"):
    """A generator task: yields 0 .. n-1, returns ``result``."""
    yield from range(n)
    return result


def count_up_logged(progress, n):
    """Yields 0 .. n-1, first writing to the file ``progress`` how many it has made (flow control shows there)."""
    with open(progress, "w") as fh:
        for i in range(n):
            fh.seek(0)
            fh.write(f"{i + 1:>12}")
            fh.flush()
            yield i


def yield_then_raise(n, message):
    yield from range(n)
    raise ValueError(message)


def pid_then_count(n, gate=None):
    """Yields its worker's pid, then 0 .. n-1; waits for the file ``gate`` (if given) after the pid."""
    yield os.getpid()
    if gate is not None:
        block_until(gate)
    yield from range(n)


def die_before_first_item_once(counter_path, n):
    """Kills its worker on the first run, before yielding anything; yields 0 .. n-1 on the next."""
    try:
        with open(counter_path) as fh:
            runs = int(fh.read() or 0)
    except FileNotFoundError:
        runs = 0
    with open(counter_path, "w") as fh:
        fh.write(str(runs + 1))
    if runs == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    yield from range(n)


def sleepy_generator(seconds):
    yield "started"
    time.sleep(seconds)
    yield "never"


def stamped(n, pause):
    """A slow generator: yields ``time.monotonic()`` as it makes each of ``n`` items, ``pause`` s apart."""
    for _ in range(n):
        yield time.monotonic()
        time.sleep(pause)


def bursts_stamped(bursts, size, pause):
    """``bursts`` times: ``size`` items at once, the last one ``time.monotonic()``, then ``pause`` s of no yield."""
    for _ in range(bursts):
        yield from range(size - 1)
        yield time.monotonic()
        time.sleep(pause)


def burst_then_wait(n, gate):
    """Yields 0 .. n-1 at once, then waits (yielding nothing) for the file ``gate``."""
    yield from range(n)
    block_until(gate)
    return "released"


def echo(channel, prefix):
    """A channel task: sends back ``prefix + obj`` for each object until the input closes."""
    for obj in channel:
        channel.send(prefix + obj)
    return "bye"


def running_total(channel):
    """Receives numbers until the input closes, sends each running total, returns the sum."""
    total = 0
    for x in channel:
        total += x
        channel.send(total)
    return total


def receive_with_timeout(channel, timeout):
    try:
        channel.receive(timeout=timeout)
    except TimeoutError:
        return "timed out"
    return "got something"


def generator_reading_its_channel():
    """A generator that takes its inputs from zpar.streaming.channel(): doubles each until EOF."""
    from zpar import streaming

    for x in streaming.channel():
        yield 2 * x


def channel_outside_a_task():
    from zpar import streaming

    return streaming.channel().task_id


def big_items(n, mib):
    """Yields ``n`` arrays of ``mib`` MiB each."""
    import numpy as np

    for i in range(n):
        yield np.full(mib * 1024 * 1024, i % 256, dtype=np.uint8)


# ---------------------------------------------------------------------- Process targets (test_process.py)


def exit_with(code):
    sys.exit(code)


def write_text(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def os_exit(code):
    os._exit(code)


def kill_self(sig):
    os.kill(os.getpid(), sig)


_INIT_VALUE = None  # set in a worker by init_global: module state, as initializers use it


def init_global(value):
    global _INIT_VALUE
    _INIT_VALUE = value


def read_global(_=None):
    """What ``init_global`` set, as a task of the same pool sees it."""
    return _INIT_VALUE
