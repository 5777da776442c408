"""A Parallel Python (pp) program running on zpar: the one change is ``import zpar.pp as pp``.

Sums the primes below several numbers, each sum a job, the way pp programs
are written: ``Server``, ``submit(func, args, depfuncs, modules)``, ``job()``,
a callback, a ``Template``, ``print_stats``.

    python examples/pp_sum_primes.py                     # local workers, one per core
    python examples/pp_sum_primes.py tcp://127.0.0.1:5555 # no local workers: a zpar-broker's agents do the work
"""

import math
import sys
import threading

import zpar.pp as pp  # noqa: PLR0402  (was: import pp; this line is the whole port)


def is_prime(n):
    """True if n is prime (trial division: slow on purpose, so there is work to share)."""
    if n < 2:
        return False
    return all(n % d != 0 for d in range(2, math.isqrt(n) + 1))


def sum_primes(n):
    """The sum of all primes below n."""
    return sum(x for x in range(2, n) if is_prime(x))


class Total:
    """Adds up results as the callbacks bring them (they run in threads of their own)."""

    def __init__(self):
        self.value, self.lock = 0, threading.Lock()

    def add(self, label, result):
        with self.lock:
            self.value += result
        print(f"  callback: {label} done")


if __name__ == "__main__":
    if len(sys.argv) > 1:  # a zpar broker ("host:port" works too, as pp's ppservers entries)
        job_server = pp.Server(0, ppservers=(sys.argv[1],))
    else:
        job_server = pp.Server()
    print("Starting pp with", job_server.get_ncpus(), "local workers; nodes:", job_server.get_active_nodes())

    # pp style: the function, its arguments, the functions it calls, the modules it needs.
    job = job_server.submit(sum_primes, (100,), (is_prime,), ("math",))
    print("Sum of primes below 100 is", job())

    inputs = (100_000, 100_100, 100_200, 100_300, 100_400, 100_500, 100_600, 100_700)
    jobs = [(n, job_server.submit(sum_primes, (n,), (is_prime,), ("math",))) for n in inputs]
    for n, job in jobs:
        print("Sum of primes below", n, "is", job())

    # A Template fixes everything but the arguments; callbacks get (*callbackargs, result).
    total = Total()
    template = pp.Template(job_server, sum_primes, (is_prime,), ("math",), callback=total.add,
                           callbackargs=("a sum",), group="template")
    for n in inputs:
        template.submit(n)
    job_server.wait("template")
    assert total.value == sum(job() for _, job in jobs), "the callbacks' total differs from the sums above"
    print("Total of the sums:", total.value)

    job_server.print_stats()
    job_server.destroy()
