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
    from zpar.ledger import execution

    with execution(exec_dir, i):
        if seconds:
            time.sleep(seconds)
        return i * i


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
