"""multiprocessing code on zpar: multiprocessing.Pool becomes zpar.Pool.

    python examples/pool_example.py                       # a private cluster on this machine
    python examples/pool_example.py tcp://127.0.0.1:5555  # a running zpar-broker

Everything below the import is plain multiprocessing.Pool code, initializer
included; only the import changed (and ``address=`` to use a cluster).
"""

import sys
import zlib

from zpar.pool import Pool  # was: from multiprocessing import Pool

_table = None  # set in each worker process by the initializer


def load_table(seed):
    """Runs once in each worker before its first task: the place for expensive set-up."""
    global _table
    _table = bytes((seed * i) % 251 for i in range(1 << 16))


def checksum(i):
    """A CRC of the worker's table salted with i: uses what the initializer made."""
    return zlib.crc32(_table + i.to_bytes(4, "little"))


def add(a, b):
    return a + b


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: start a private cluster

    with Pool(initializer=load_table, initargs=(7,), address=address) as pool:
        sums = pool.map(checksum, range(10_000))  # chunks computed as multiprocessing does
        print(f"{len(sums):,} checksums, first {sums[0]:#010x}, last {sums[-1]:#010x}")

        print("starmap:", pool.starmap(add, [(1, 2), (3, 4), (5, 6)]))

        result = pool.apply_async(checksum, (42,), callback=lambda v: print(f"callback got {v:#010x}"))
        print("apply_async:", hex(result.get(timeout=30)))

        for i, value in enumerate(pool.imap(checksum, range(3))):
            print(f"imap {i}: {value:#010x}")
        pool.close()
        pool.join()  # waits for every task, then stops the private cluster
