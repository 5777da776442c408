"""A pprocess program on zpar: the import is the only change.

pprocess (by Paul Boddie) forks one process per call. With
``import zpar.pprocess as pprocess`` the same calls run on zpar's workers:
this machine's cores, or a cluster's.

    python examples/pprocess_example.py                       # a private cluster on this machine
    python examples/pprocess_example.py tcp://127.0.0.1:5555  # a running zpar-broker (create() is skipped)

It fills an N x N table four ways, as pprocess's own examples do: pmap, a
Queue of MakeParallel calls, a continuous Queue of calls that send each cell
as they go, and (on this machine only) a Map of forked children.
"""

import sys
import time

import zpar.pprocess as pprocess  # noqa: PLR0402  (was: import pprocess; this line is the whole port)

N = 6
delay = 0.05  # a stand-in for real work, per cell


def calculate(i, j):
    """A supposedly time-consuming calculation on i and j."""
    time.sleep(delay)
    return i * N + j


def calculate_cell(t):
    """pmap passes each item as one argument."""
    i, j = t
    return calculate(i, j)


def calculate_located(i, j):
    """The result with its place, for a Queue, whose results come in any order."""
    return i, j, calculate(i, j)


def calculate_row(channel, i):
    """A channel-aware call: sends each cell of row i as soon as it is done."""
    for j in range(N):
        channel.send((i, j, calculate(i, j)))


def show(title, results, took):
    print(f"{title} ({took:.2f} s):")
    for i in range(N):
        print("   ", " ".join(f"{value:3d}" for value in results[i * N:i * N + N]))


def from_queue(queue):
    table = [0] * N * N
    for i, j, value in queue:  # in the order the results arrive
        table[i * N + j] = value
    return table


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None
    if address:
        pprocess.use(address)  # (secret_file="..." for a cluster started with a secret)
    limit = pprocess.get_number_of_cores()
    print(f"up to {limit} calls at once")
    cells = [(i, j) for i in range(N) for j in range(N)]

    # 1. pmap: results in input order, each available as soon as it is in.
    start = time.perf_counter()
    results = pprocess.pmap(calculate_cell, cells, limit=limit)
    table = results[0:N * N]  # waits for them all
    show("pmap", table, time.perf_counter() - start)

    # 2. A Queue of managed MakeParallel calls: results in arrival order.
    start = time.perf_counter()
    queue = pprocess.Queue(limit=limit)
    calc = queue.manage(pprocess.MakeParallel(calculate_located))
    for i, j in cells:
        calc(i, j)
    show("Queue and MakeParallel", from_queue(queue), time.perf_counter() - start)

    # 3. A continuous Queue: each call sends a whole row, cell by cell, over its channel.
    start = time.perf_counter()
    queue = pprocess.Queue(limit=limit, continuous=1)
    calc = queue.manage(calculate_row)
    for i in range(N):
        calc(i)
    show("continuous Queue", from_queue(queue), time.perf_counter() - start)

    # 4. create(): fork a child per cell, as pprocess does; forks stay on this machine.
    if address is None:
        start = time.perf_counter()
        results = pprocess.Map(limit=limit)
        for i, j in cells:
            channel = results.create()
            if channel:  # in the child
                try:
                    channel.send(calculate(i, j))
                finally:
                    pprocess.exit(channel)
        table = list(results)
        show("Map and create() (forked children)", table, time.perf_counter() - start)

    pprocess.shutdown()
