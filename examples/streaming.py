"""Streams and channels: results as a task makes them, and a conversation with a running task.

1. A generator task streams each value it yields to the producer, which reads
   them as they come (``future.stream()``). A reader that falls behind pauses
   the generator: at most a window of values is ever in flight.
2. ``client.start(fn, ...)`` runs ``fn(channel, ...)``: the producer sends it
   objects (``future.send``) and reads what it sends back (``future.receive``),
   while the task keeps its state between messages.

    python examples/streaming.py                      # a private cluster on this machine
    python examples/streaming.py tcp://127.0.0.1:5555 # a running zpar-broker
"""

import math
import sys
import time

import zpar


def primes_between(lo, hi, chunk=20_000):
    """Yields ``(end of range, primes found in it)`` every ``chunk`` numbers; returns how many in all."""
    total = 0
    for start in range(lo, hi, chunk):
        end = min(start + chunk, hi)
        found = [n for n in range(max(start, 2), end) if all(n % d for d in range(2, math.isqrt(n) + 1))]
        total += len(found)
        yield end, found
    return total


def accumulator(channel, name):
    """Keeps a running mean of the numbers sent to it; answers each with the mean so far."""
    count, mean = 0, 0.0
    for x in channel:  # until the producer calls close_input()
        count += 1
        mean += (x - mean) / count
        channel.send((name, count, round(mean, 3)))
    return count


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None
    with zpar.Client(address) as client:
        print("1. primes below 200,000, streamed in chunks as the worker finds them")
        start = time.perf_counter()
        fut = client.submit(primes_between, 0, 200_000)
        for end, found in fut.stream():
            print(f"   {time.perf_counter() - start:6.2f} s  up to {end:>7,}: {len(found):>5,} primes, "
                  f"the last {found[-1] if found else '-'}")
        print(f"   in all: {fut.result():,} primes (the generator's return value)")

        print("2. two running tasks, each keeping its own state, fed from here")
        left, right = client.start(accumulator, "left"), client.start(accumulator, "right")
        for i in range(1, 6):
            left.send(i)
            right.send(i * i)
            print("  ", left.receive(timeout=30), right.receive(timeout=30))
        for fut in (left, right):
            fut.close_input()
        print(f"   they took {left.result(timeout=30)} and {right.result(timeout=30)} numbers")
