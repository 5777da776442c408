"""concurrent.futures code on zpar: ProcessPoolExecutor becomes zpar.Executor.

    python examples/executor_example.py                       # a private cluster on this machine
    python examples/executor_example.py tcp://127.0.0.1:5555  # a running zpar-broker

Everything below the import is plain concurrent.futures; only the class name
changed. Give an address and the same code runs on a cluster of machines.
"""

import concurrent.futures
import sys

# was: from concurrent.futures import ProcessPoolExecutor as Executor
from zpar.executor import Executor


def collatz_steps(n):
    """How many steps the Collatz sequence takes from n down to 1 (CPU work, no I/O)."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: start a private cluster

    with Executor(address=address) as executor:
        # submit() and as_completed(): each result as soon as it is in.
        starts = [27, 97, 871, 6171, 77031, 837799]
        futures = {executor.submit(collatz_steps, n): n for n in starts}
        for future in concurrent.futures.as_completed(futures, timeout=60):
            print(f"{futures[future]:>7,} takes {future.result():>3} steps")

        # map(): results in input order; chunksize puts many small calls in one task.
        below = range(1, 200_000)
        longest = max(zip(executor.map(collatz_steps, below, chunksize=5_000), below, strict=True))
        print(f"below 200,000 the longest run is {longest[0]} steps, from {longest[1]:,}")
    # Leaving the block waited for every task and stopped the private cluster.
