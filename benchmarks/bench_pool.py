#!/usr/bin/env python
"""zpar.Pool against multiprocessing.Pool, in the same run.

    python benchmarks/bench_pool.py [--quick] [--workers W] [--json out.json]

Each measure runs every tool once per repetition, the order rotating, and
keeps each tool's best; the figure that counts is the ratio zpar / Pool taken
in this run (the machine's cores change speed from run to run). Pools are
started before the clock runs: start-up is bench_core.py's business.

1. map, tiny tasks, chunksize=100     ``pool.map(noop, items, 100)``, tasks/s   bar: zpar >= 0.8x Pool
2. map, tiny tasks, default chunksize ``pool.map(noop, items)``, tasks/s        (multiprocessing's formula)
3. imap, tiny tasks, chunksize=100    ``list(pool.imap(noop, items, 100))``, tasks/s
4. apply_async, tiny tasks            N ``apply_async`` then every ``get()``, tasks/s
5. CPU-bound on a 2-node cluster      ``pool.map(sum_primes, ..., 1)``, seconds;
   zpar.Pool(address=...) on ``LocalCluster(agents=2, workers=1)`` (two agents,
   the "nodes", of one worker each) against multiprocessing.Pool(1), one such
   node's worth, and against multiprocessing.Pool(2). Honest reading: on one
   machine the two "nodes" share its cores, so against Pool(2), the same cores,
   parity is what to expect (a figure far from 1x there is the machine's noise,
   not zpar); against Pool(1) the cluster should approach 2x, which is what
   adding a second machine buys.
   bar: zpar on 2 nodes faster than Pool(1).

The functions live in benchmarks/_tasks.py, which every worker imports (the
cluster's daemons get benchmarks/ on their PYTHONPATH): both tools pickle them
by reference.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

# benchmarks/ is on sys.path
from _common import rotated, write_json
from _tasks import calibrate, noop, sum_primes

import zpar.pool
from zpar.testing import LocalCluster

perf = time.perf_counter


def measure(pools: dict[str, Any], reps: int, run: Callable[[Any], float]) -> dict[str, float]:
    """Each tool's best figure over ``reps`` interleaved repetitions (``run`` returns seconds)."""
    best: dict[str, float] = {}
    for rep in range(reps):
        for name in rotated(list(pools), rep):
            gc.collect()
            took = run(pools[name])
            best[name] = min(took, best.get(name, float("inf")))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 5, quick 2)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    w = args.workers
    reps = args.reps or (2 if args.quick else 5)
    n_map = 100_000 if args.quick else 500_000
    n_apply = 2_000 if args.quick else 10_000
    report: dict[str, Any] = {"python": sys.version.split()[0], "machine": platform.machine(),
                              "cpus": os.cpu_count(), "workers": w, "reps": reps, "rows": {}}
    rows = report["rows"]

    def row(key: str, title: str, n: int, best: dict[str, float], bar: float | None = None) -> None:
        rates = {k: n / v for k, v in best.items()}
        ratio = rates["zpar"] / rates["Pool"]
        verdict = "" if bar is None else ("  PASS" if ratio >= bar else "  FAIL") + f" (bar {bar}x)"
        print(f"{title:<40} zpar {rates['zpar'] / 1e3:8.0f}k/s   Pool {rates['Pool'] / 1e3:8.0f}k/s   "
              f"ratio {ratio:5.2f}x{verdict}", flush=True)
        rows[key] = {"tasks_per_s": rates, "ratio": ratio, "bar": bar}

    items = list(range(n_map))
    print(f"zpar.Pool({w}) vs multiprocessing.Pool({w}); best of {reps}, order rotating", flush=True)
    with zpar.pool.Pool(w) as zp, mp.Pool(w) as mpp:
        pools = {"zpar": zp, "Pool": mpp}
        for p in pools.values():  # warm-up: workers started, functions shipped
            p.map(noop, items[: n_map // 10], 100)
            p.apply(noop, (1,))

        def timed(fn: Callable[[Any], Any], expect: Any) -> Callable[[Any], float]:
            def run(p: Any) -> float:
                t0 = perf()
                out = fn(p)
                took = perf() - t0
                if out != expect:
                    raise AssertionError("wrong results")
                return took
            return run

        row("map_c100", "map, tiny tasks, chunksize=100", n_map,
            measure(pools, reps, timed(lambda p: p.map(noop, items, 100), items)), bar=0.8)
        row("map_default", "map, tiny tasks, default chunksize", n_map,
            measure(pools, reps, timed(lambda p: p.map(noop, items), items)))
        row("imap_c100", "imap, tiny tasks, chunksize=100", n_map,
            measure(pools, reps, timed(lambda p: list(p.imap(noop, items, 100)), items)))
        few = items[:n_apply]
        row("apply_async", "apply_async one by one, tiny tasks", n_apply,
            measure(pools, reps, timed(lambda p: [r.get() for r in [p.apply_async(noop, (x,)) for x in few]], few)))

    n, _ = calibrate(0.03 if args.quick else 0.08)
    calls = 8 if args.quick else 16
    expected = [sum_primes(n)] * calls
    print(f"\nCPU-bound: {calls} calls of sum_primes({n:,}) (~{0.03 if args.quick else 0.08:g} s each), "
          f"map with chunksize=1", flush=True)
    with LocalCluster(agents=2, workers=1, heartbeat=0.5) as cluster, \
            zpar.pool.Pool(address=cluster.frontend) as zp, mp.Pool(1) as one, mp.Pool(2) as two:
        pools = {"zpar": zp, "Pool(1)": one, "Pool(2)": two}
        for p in pools.values():
            p.map(sum_primes, [n] * 2, 1)

        def cpu(p: Any) -> float:
            t0 = perf()
            out = p.map(sum_primes, [n] * calls, 1)
            took = perf() - t0
            if out != expected:
                raise AssertionError("wrong results")
            return took

        best = measure(pools, reps, cpu)
    for peer in ("Pool(1)", "Pool(2)"):
        ratio = best[peer] / best["zpar"]
        bar = " (bar: > 1x)" if peer == "Pool(1)" else " (same cores: expect parity)"
        verdict = ("  PASS" if ratio > 1 else "  FAIL") if peer == "Pool(1)" else ""
        print(f"zpar on 2 nodes x 1 worker vs {peer:<8} {best['zpar']:6.2f} s vs {best[peer]:6.2f} s   "
              f"speed-up {ratio:5.2f}x{verdict}{bar}", flush=True)
    rows["cpu_2node"] = {"seconds": best, "n": n, "calls": calls,
                         "speedup_vs_pool1": best["Pool(1)"] / best["zpar"],
                         "speedup_vs_pool2": best["Pool(2)"] / best["zpar"]}
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
