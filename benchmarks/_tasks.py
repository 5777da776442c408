"""The task functions the benchmarks hand to workers, and what sizes them.

Functions of an importable module are pickled by reference (by pickle, and by
zpar, which tries pickle first), so every worker must be able to import this
module. multiprocessing's children and zpar's embedded cluster get our
``sys.path``, which holds benchmarks/ when a benchmark runs as a script; a
``LocalCluster``'s daemons get only our environment. Importing this module
therefore puts benchmarks/ on ``PYTHONPATH`` for every process started after.
Kept free of heavy imports: each fresh worker imports it.
"""

from __future__ import annotations

import os
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_HERE, os.environ.get("PYTHONPATH")) if p)


def noop(x):
    """The tiny task: returns its argument."""
    return x


def expected(i: int) -> int:
    """The value a task known in advance returns for ``i``."""
    return (i * 2654435761) % 1_000_003


def sum_primes(n):
    """Sum of the primes below ``n`` by trial division: pure-Python CPU work."""
    total = 0
    for k in range(2, n):
        d = 2
        while d * d <= k:
            if k % d == 0:
                break
            d += 1
        else:
            total += k
    return total


def calibrate(target_s: float) -> tuple[int, float]:
    """An ``n`` for which one ``sum_primes(n)`` takes about ``target_s`` here, and what the last one took."""
    n = 5000
    while True:
        t0 = time.perf_counter()
        sum_primes(n)
        took = time.perf_counter() - t0
        if took >= target_s / 4 or n > 50_000_000:
            break
        n *= 2
    for _ in range(3):  # cost grows a little faster than n (n^1.5 / log n): a few corrections
        n = max(1000, int(n * (target_s / took) ** (1 / 1.4)))
        t0 = time.perf_counter()
        sum_primes(n)
        took = time.perf_counter() - t0
    return n, took
