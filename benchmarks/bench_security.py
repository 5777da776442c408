#!/usr/bin/env python
"""Authentication's cost: a cluster with the default authentication against an --insecure one, in one run.

    python benchmarks/bench_security.py [--quick] [--tasks N] [--repeats R] [--json out.json]

Two ``LocalCluster(agents=1, workers=2)`` over TCP loopback, started side by
side: ``default`` (given no secret, every process uses this user's own secret,
so every TCP hop is CurveZMQ with the ZAP check: producer to broker, broker to
agent, agent to collector) and ``insecure`` (``insecure=True``: plaintext, no
authentication). The user's secret is made in a private ``XDG_CONFIG_HOME``
(``_cluster.private_config_home``), never in the caller's home. Each
measurement alternates between the two clusters, the order rotated each
repetition; median and best of ``--repeats`` are kept:

1. tiny tasks: ``list(client.map(noop, range(N), chunksize=1))`` (tasks/s);
2. tiny tasks, ``submit`` one at a time, then wait for all (tasks/s);
3. a 64 MB NumPy argument to a task that returns its size (MB/s of argument);
4. a new ``Client`` to the running cluster, up to its first result (ms): the
   producer's own cost of the default (reading the secret, deriving the keys,
   the CurveZMQ handshake and the ZAP check).

Also timed in this process: deriving a keygen secret's keypairs, as every
process does once (microseconds: such a secret is not scrypt-stretched).

Bars: issue 10, median default / median insecure >= 0.9 for tiny tasks (map
and submit each; issue 4's 0.85 is inside it); issue 4, the 64 MB argument at
>= 300 MB/s with authentication on (median). Exit code 0 when all hold, 1
otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

# benchmarks/ is on sys.path
from _cluster import private_config_home, start_cluster
from _common import git_state, print_verdicts, rotated, write_json
from _tasks import noop

NAMES = ("insecure", "default")


def nbytes(array):
    return array.nbytes


def map_rate(client, n: int, big: np.ndarray) -> float:
    t = time.perf_counter()
    assert list(client.map(noop, range(n), chunksize=1)) == list(range(n))
    return n / (time.perf_counter() - t)


def submit_rate(client, n: int, big: np.ndarray) -> float:
    t = time.perf_counter()
    futures = [client.submit(noop, i) for i in range(n)]
    assert client.gather(futures, timeout=120) == list(range(n))
    return n / (time.perf_counter() - t)


def arg_rate(client, n: int, big: np.ndarray) -> float:
    t = time.perf_counter()
    assert client.submit(nbytes, big).result(timeout=120) == big.nbytes
    return big.nbytes / 1e6 / (time.perf_counter() - t)


def connect_ms(cluster, insecure: bool) -> float:
    import zpar

    t = time.perf_counter()
    client = zpar.Client(cluster.frontend, insecure=insecure)
    try:
        assert client.submit(noop, 7).result(timeout=30) == 7
        return (time.perf_counter() - t) * 1000
    finally:
        client.close()


def key_derivation_us(rounds: int = 200) -> float:
    """Median microseconds to turn a fresh ``zpar keygen`` secret into the roles' keypairs."""
    from zpar import security

    times = []
    for _ in range(rounds):
        secret = security.generate_secret()
        t = time.perf_counter()
        security.derive_keys(secret)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


METRICS: dict[str, tuple[str, Callable[..., float], bool]] = {  # key -> (label, measure, higher is better)
    "map_tasks_s": ("map, chunksize 1 (tasks/s)", map_rate, True),
    "submit_tasks_s": ("submit one by one (tasks/s)", submit_rate, True),
    "arg_64mb_MB_s": ("64 MB argument (MB/s)", arg_rate, True),
    "connect_ms": ("new Client to 1st result (ms)", None, False),  # type: ignore[dict-item]
}


def cell(median: float, best: float, digits: int) -> str:
    return f"{median:,.{digits}f} ({best:,.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks and repetitions")
    ap.add_argument("--tasks", type=int, help="tiny tasks per map and per submit run (default 20,000; "
                    "10,000 with --quick)")
    ap.add_argument("--repeats", type=int, help="alternating repetitions, median kept (default 5; 3 with --quick)")
    ap.add_argument("--bar", type=float, default=0.9, help="tiny tasks: default / insecure bar (0.9)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    n = args.tasks or (10_000 if args.quick else 20_000)
    repeats = args.repeats or (3 if args.quick else 5)
    private_config_home()
    big = np.random.default_rng(4).random((64 << 20) // 8)
    log = os.path.join(tempfile.gettempdir(), f"zpar-bench-security-{os.getpid()}.log")  # $TMPDIR first
    clusters = {}
    samples: dict[str, dict[str, list[float]]] = {name: {key: [] for key in METRICS} for name in NAMES}
    t0 = time.perf_counter()
    try:  # started inside: if the second fails to start, the first is still stopped
        for name in NAMES:
            clusters[name] = start_cluster(log, agents=1, workers=2, heartbeat=1.0, insecure=name == "insecure")
        clients = {name: c.client() for name, c in clusters.items()}
        for name, client in clients.items():
            client.wait_for_workers(2)
            for _, fn, _ in METRICS.values():  # warm: functions shipped, workers started
                if fn is not None:
                    fn(client, 2000, big[:1000])
            connect_ms(clusters[name], name == "insecure")
        for rep in range(repeats):
            for key, (_, fn, _) in METRICS.items():
                for name in rotated(NAMES, rep):
                    value = (connect_ms(clusters[name], name == "insecure") if fn is None
                             else fn(clients[name], n, big))
                    samples[name][key].append(value)
    finally:
        for c in clusters.values():
            c.stop()
    derive_us = key_derivation_us()
    med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    best = {name: {k: (max(v) if METRICS[k][2] else min(v)) for k, v in s.items()} for name, s in samples.items()}
    print(f"bench_security: LocalCluster(agents=1, workers=2) over TCP loopback, default authentication "
          f"(this user's own secret: CurveZMQ + ZAP) against insecure=True; {n:,} tiny tasks per map and per "
          f"submit run; {repeats} alternating repetitions, median (best); {os.cpu_count()} cores, python "
          f"{sys.version.split()[0]}; {time.perf_counter() - t0:.0f} s")
    print(f"{'':32}{'insecure':>18}{'default':>18}{'default/insecure':>18}")
    for key, (label, _, _) in METRICS.items():
        i, d = med["insecure"][key], med["default"][key]
        bi, bd = best["insecure"][key], best["default"][key]
        digits = 1 if key == "connect_ms" else 0
        print(f"{label:32}{cell(i, bi, digits):>18}{cell(d, bd, digits):>18}{f'{d / i:.3f} ({bd / bi:.3f})':>18}")
    print(f"deriving a keygen secret's keypairs (every process, once): {derive_us:.0f} us (median of 200)")
    ratios = {k: med["default"][k] / med["insecure"][k] for k in ("map_tasks_s", "submit_tasks_s")}
    ok = print_verdicts([
        (f"map: default / insecure >= {args.bar:g} (medians)", ratios["map_tasks_s"] >= args.bar,
         f"{ratios['map_tasks_s']:.3f}"),
        (f"submit: default / insecure >= {args.bar:g} (medians)", ratios["submit_tasks_s"] >= args.bar,
         f"{ratios['submit_tasks_s']:.3f}"),
        ("64 MB argument with authentication >= 300 MB/s (median)", med["default"]["arg_64mb_MB_s"] >= 300,
         f"{med['default']['arg_64mb_MB_s']:,.0f}"),
    ])
    if args.json:
        write_json(args.json, {"tasks": n, "repeats": repeats, "samples": samples, "median": med, "best": best,
                               "ratios": ratios, "key_derivation_us": derive_us, "commit": git_state()})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
