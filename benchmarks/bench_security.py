#!/usr/bin/env python
"""CurveZMQ's cost: the same cluster with and without a shared secret, in one run.

    python benchmarks/bench_security.py [--quick] [--json out.json]

Two ``LocalCluster(agents=1, workers=2)`` over TCP loopback, one plain and one
with a secret (every TCP hop encrypted: producer to broker, broker to agent,
agent to collector), measured alternately, best of ``--repeats``:

1. tiny tasks: ``list(client.map(noop, range(N)))``, chunksize 1 (tasks/s);
2. tiny tasks, ``submit`` one at a time then wait for all (tasks/s);
3. a 64 MB NumPy argument to a task that returns its length (MB/s of argument).

Bars (issue 4): curve/plain >= 0.85 for tiny tasks; the 64 MB argument at
>= 300 MB/s with curve on. Exit code 0 when both hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

# benchmarks/ is on sys.path
from _cluster import start_cluster
from _common import print_verdicts, write_json
from _tasks import noop

SECRET = "bench-" + "Xq4vN8sLr2Tz7Wm1Kp5Yc0Hd"


def nbytes(array):
    return array.nbytes


def measure(client, n: int, big: np.ndarray) -> dict[str, float]:
    t = time.perf_counter()
    assert len(list(client.map(noop, range(n), chunksize=1))) == n
    mapped = n / (time.perf_counter() - t)
    t = time.perf_counter()
    futures = [client.submit(noop, i) for i in range(n // 2)]
    client.gather(futures, timeout=120)
    submitted = (n // 2) / (time.perf_counter() - t)
    t = time.perf_counter()
    assert client.submit(nbytes, big).result(timeout=120) == big.nbytes
    moved = big.nbytes / 1e6 / (time.perf_counter() - t)
    return {"map_tasks_s": mapped, "submit_tasks_s": submitted, "arg_64mb_MB_s": moved}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks and repeats")
    ap.add_argument("--tasks", type=int, help="tiny tasks per map (default 50,000; 10,000 with --quick)")
    ap.add_argument("--repeats", type=int, help="rounds, best kept (default 5; 2 with --quick)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    n = args.tasks or (10_000 if args.quick else 50_000)
    repeats = args.repeats or (2 if args.quick else 5)
    big = np.random.default_rng(4).random((64 << 20) // 8)
    log = os.path.join(tempfile.gettempdir(), f"zpar-bench-security-{os.getpid()}.log")  # $TMPDIR first
    clusters = {}
    best: dict[str, dict[str, float]] = {"plain": {}, "curve": {}}
    try:  # started inside: if the second fails to start, the first is still stopped
        clusters["plain"] = start_cluster(log, agents=1, workers=2, heartbeat=1.0)
        clusters["curve"] = start_cluster(log, agents=1, workers=2, heartbeat=1.0, secret=SECRET)
        clients = {name: c.client() for name, c in clusters.items()}
        for client in clients.values():
            client.wait_for_workers(2)
            measure(client, 1000, big[:1000])  # warm: functions shipped, workers started
        for _ in range(repeats):
            for name, client in clients.items():
                for key, value in measure(client, n, big).items():
                    best[name][key] = max(best[name].get(key, 0.0), value)
    finally:
        for c in clusters.values():
            c.stop()
    print(f"bench_security: LocalCluster(agents=1, workers=2) over TCP loopback, {n:,} tiny tasks, best of "
          f"{repeats}; {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"{'':24}{'plain':>14}{'curve':>14}{'curve/plain':>13}")
    for key, label in (("map_tasks_s", "map, chunksize 1 (/s)"), ("submit_tasks_s", "submit one by one (/s)"),
                       ("arg_64mb_MB_s", "64 MB argument (MB/s)")):
        p, c = best["plain"][key], best["curve"][key]
        print(f"{label:24}{p:>14,.0f}{c:>14,.0f}{c / p:>13.2f}")
    tiny = min(best["curve"][k] / best["plain"][k] for k in ("map_tasks_s", "submit_tasks_s"))
    ok = print_verdicts([
        ("tiny tasks with curve >= 0.85 of plain", tiny >= 0.85, f"{tiny:.2f}"),
        ("64 MB argument with curve >= 300 MB/s", best["curve"]["arg_64mb_MB_s"] >= 300,
         f"{best['curve']['arg_64mb_MB_s']:,.0f}"),
    ])
    if args.json:
        write_json(args.json, {"tasks": n, "repeats": repeats, "best": best, "tiny_ratio": tiny})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
