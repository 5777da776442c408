"""``multiprocessing.Process`` code on zpar: the same API, run as tasks on the cluster.

``zpar.process.Process`` takes a ``target`` (or a subclass overrides ``run()``),
``start()`` runs it on a worker, ``join()`` waits, and ``exitcode`` says how it
ended, as with multiprocessing: 0, the code given to ``sys.exit``, 1 if it
raised, ``-SIGTERM`` after ``terminate()``.

    python examples/process_example.py                      # a private cluster on this machine
    python examples/process_example.py tcp://127.0.0.1:5555 # a running zpar-broker
"""

import os
import sys
import time

import zpar
from zpar.process import Process


def greet(name):
    print(f"hello {name} from worker pid {os.getpid()}", flush=True)  # on the worker's output


def leave(code):
    sys.exit(code)


def fail():
    raise RuntimeError("this one fails")


def wait_forever():
    while True:
        time.sleep(0.1)


class Countdown(Process):
    """A subclass: the object travels to the worker, and run() is called there."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def run(self):
        for _ in range(self.n):
            time.sleep(0.05)
        sys.exit(self.n)


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None
    with zpar.Client(address) as client:  # without client=..., Processes share an embedded cluster
        processes = [
            Process(target=greet, args=("world",), client=client),
            Process(target=leave, args=(3,), client=client),
            Process(target=fail, client=client),  # its traceback is printed on the worker's stderr
            Countdown(5, name="countdown", client=client),
        ]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=60)
            print(f"{p.name:>10}: exitcode {p.exitcode}")

        forever = Process(target=wait_forever, client=client)
        forever.start()
        forever.join(timeout=0.5)
        print(f"{forever.name:>10}: alive after 0.5 s: {forever.is_alive()}; pid {forever.pid}")
        forever.terminate()
        forever.join()
        print(f"{forever.name:>10}: exitcode {forever.exitcode} after terminate()")
