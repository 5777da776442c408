"""Sum of the primes below N, for several N: Parallel Python's classic example.

Each sum is an independent, CPU-bound job, so zpar can run them at the same
time, one per core, in worker processes (no GIL in the way).

    python examples/sum_primes.py                      # a private cluster on this machine
    python examples/sum_primes.py tcp://127.0.0.1:5555 # a running zpar-broker (see cluster_walkthrough.md)
"""

import math
import sys
import time

import zpar


def is_prime(n):
    """True if n is prime (trial division: slow on purpose, so there is work to share)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d != 0 for d in range(3, math.isqrt(n) + 1, 2))


def sum_primes(n):
    """The sum of all primes below n."""
    return sum(x for x in range(2, n) if is_prime(x))


# The guard matters: only the producer runs this part. (zpar's workers are fresh
# interpreters that never import this file; functions defined here travel to
# them by value, with cloudpickle, including is_prime, which sum_primes uses.)
if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: start a private cluster
    inputs = [100_000 + 25_000 * i for i in range(8)]  # 100,000 to 275,000

    # 1. Serially, in this process, as a baseline.
    start = time.perf_counter()
    serial = [sum_primes(n) for n in inputs]
    t_serial = time.perf_counter() - start
    print(f"serial:   {t_serial:6.2f} s for {len(inputs)} sums")

    # 2. In parallel. Client() starts a broker and one worker per core as child
    #    processes, and stops them when the `with` block ends.
    start = time.perf_counter()
    with zpar.Client(address) as client:
        workers = client.wait_for_workers()  # the cluster's worker processes take a moment to start
        print(f"{workers} workers ready in {time.perf_counter() - start:.2f} s ({client!r})")
        start = time.perf_counter()
        # submit() returns at once with a Future; the jobs run while we go on.
        jobs = [(n, client.submit(sum_primes, n)) for n in inputs]
        for n, job in jobs:
            # result() waits for that one job (in submission order here).
            print(f"  sum of primes below {n:,} is {job.result():,}")
        t_parallel = time.perf_counter() - start

    print(f"parallel: {t_parallel:6.2f} s  (speed-up {t_serial / t_parallel:.2f}x)")
    assert [job.result() for _, job in jobs] == serial, "parallel results differ from serial ones"
    print("all results match the serial ones")
