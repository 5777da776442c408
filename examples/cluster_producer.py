"""A producer for a running zpar cluster: `zpar-broker` plus one or more `zpar-agent`.

    python examples/cluster_producer.py [ADDRESS]   # ADDRESS: the broker's frontend,
                                                    # default tcp://127.0.0.1:5555

It waits until the cluster has workers, runs tasks that report where they ran,
shows how the work spread over the nodes, and shows a task's exception coming
back to the producer. See cluster_walkthrough.md for the whole session.
"""

import collections
import os
import socket
import sys
import time

import zpar


def collatz_steps(n):
    """Some CPU work: the longest Collatz chain starting below n. Returns where it ran, too."""
    best = 0
    for start in range(1, n):
        steps, x = 0, start
        while x != 1:
            x = x // 2 if x % 2 == 0 else 3 * x + 1
            steps += 1
        best = max(best, steps)
    return best, f"{socket.gethostname()} pid {os.getpid()}"


def fails(x):
    """A task that raises, to show what the producer gets."""
    raise ValueError(f"no good: {x}")


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
    # With an address, Client() connects to that broker instead of starting its
    # own; it raises zpar.BrokerUnavailable if nobody answers there in 10 s.
    with zpar.Client(address) as client:
        # Tasks sent before any agent joins would just wait in the broker's
        # queue; waiting here makes the output clearer.
        try:
            client.wait_for_workers(1, timeout=30)
        except TimeoutError as exc:
            sys.exit(str(exc))
        status = client.status()
        print(f"connected to {address}: {len(status['nodes'])} node(s), {status['workers']} worker(s)")
        for node in status["nodes"]:
            print(f"  {node['name']}: {node['workers']} worker(s)")

        # imap_unordered yields each result as soon as it is in, in any order.
        inputs = [20_000 + 500 * i for i in range(16)]
        start = time.perf_counter()
        per_worker = collections.Counter()
        for _steps, where in client.imap_unordered(collatz_steps, inputs):
            per_worker[where] += 1
        print(f"{len(inputs)} tasks in {time.perf_counter() - start:.2f} s, spread over:")
        for where, count in sorted(per_worker.items()):
            print(f"  {where}: {count} tasks")

        # The results match a local run (map() keeps input order).
        check = [steps for steps, _ in client.map(collatz_steps, inputs[:4])]
        assert check == [collatz_steps(n)[0] for n in inputs[:4]], "results differ from a local run"
        print("results match a local run")

        # A task's exception comes back as itself, with where it happened.
        try:
            client.submit(fails, 42).result()
        except ValueError as exc:
            print(f"task raised ValueError({exc}) on {exc.host} pid {exc.pid}")
