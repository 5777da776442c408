#!/usr/bin/env python
"""Back-pressure benchmark (RELIABILITY.md A2): a producer far faster than its workers.

    python benchmarks/bench_backpressure.py [--quick] [--tasks N] [--sleep-ms MS] [--json out.json]

A ``LocalCluster(agents=1, workers=2)`` whose tasks sleep ``--sleep-ms`` (1 ms)
runs about 850-1,300 tasks/s on a 2-core box, while one producer thread can submit
10,000 and more a second. The producer submits N tiny tasks as fast as it can,
in two variants, each on a fresh cluster:

- ``submit``: ``client.submit(fn, i)`` in a loop; each future is checked by a
  done-callback and then forgotten (the benchmark keeps one byte per task, so
  the producer's RSS is the client's, not ours);
- ``map``: ``client.map(fn, generator, chunksize=1)``, results checked in order.

A sampling thread records, every 0.2 s, the RSS of the broker, of the agent,
of the agent's workers (summed) and of this producer; another asks the broker
for its status every second (queued and running tasks). The report gives the
RSS of each at 10 %, 50 % and 100 % of the outcomes, the growth from 10 % to
100 % (bar: < 10 % for broker, agent and producer), the peak, how long the
producer was blocked (calls to ``submit``, or to the map's ``next``, that took
more than 1 ms), and lost / wrong / duplicated outcomes (bar: 0).

Default: 100,000 tasks per variant at 1 ms (about 2 minutes each here);
``--quick``: 15,000 (under 20 s each). RELIABILITY's full A2 is
``--tasks 1000000`` (about 15-20 minutes per variant on a 2-core box). Exit code 0 when the bars hold, 1 when one is
missed, 2 when the benchmark itself broke. Every wait has a deadline, and the
cluster is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil

# benchmarks/ is on sys.path
from _cluster import RssWatch, cluster_pids, start_cluster, stop_cluster, summarize_log
from _common import count_zpar_logs, finish_run, print_verdicts
from _tasks import expected

from zpar.testing import LocalCluster

now = time.monotonic
BLOCKED_S = 0.001  # a call that takes longer than this counts as blocked
ROLES = ("broker", "agent", "workers", "producer")
BARRED = ("broker", "agent", "producer")  # the growth bar; workers are reported


def make_task(sleep_s: float) -> Callable[[int], int]:
    """A task that sleeps ``sleep_s`` and returns ``expected(i)``; defined here, it travels by value."""
    def slow_task(i: int) -> int:
        if sleep_s > 0:
            time.sleep(sleep_s)
        return expected(i)
    return slow_task


# ---------------------------------------------------------------------- sampling


class Sampler(RssWatch):
    """RSS of broker, agent, workers and producer every 0.2 s; broker status every second."""

    def __init__(self, cluster: LocalCluster, progress: Callable[[], int]) -> None:
        super().__init__(lambda: cluster_pids(cluster), 0.2, extra=lambda: {"done": progress()})
        self.cluster = cluster
        self.status: list[dict[str, Any]] = []
        self.next_status = 0.0

    def sample(self) -> dict[str, Any]:
        s = super().sample()
        if now() >= self.next_status:
            self.next_status = now() + 1.0
            try:
                st = self.cluster.status(2.0)
                self.status.append({"t": round(now() - self.t0, 3), "queued": st["queued"],
                                    "running": st["running"], "producers": st["producers"],
                                    "nodes": len(st["nodes"])})
            except Exception as exc:  # noqa: BLE001 - a missed status is reported, never fatal
                if len(self.errors) < 10:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
        return s


def at_fraction(samples: list[dict[str, Any]], n: int, frac: float, role: str) -> int | None:
    """The role's RSS in the first sample with at least ``frac`` of the outcomes in."""
    for s in samples:
        if s["done"] >= frac * n and s.get(role):
            return s[role]
    return None


# ---------------------------------------------------------------------- one variant


def run_variant(variant: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    n = args.tasks
    fn = make_task(args.sleep_ms / 1000)
    log_path = os.path.join(workdir, f"cluster-{variant}.log")
    out: dict[str, Any] = {"variant": variant, "tasks": n, "sleep_ms": args.sleep_ms, "log": log_path}
    seen = bytearray(n)
    tally = collections.Counter()  # done, wrong, dup, errors by type
    blocked = {"calls": 0, "blocked_calls": 0, "blocked_s": 0.0, "max_block_s": 0.0, "loop_s": 0.0}
    state = {"deadline_hit": False}
    cluster = None
    sampler = None
    watchdog_stop = threading.Event()
    try:
        cluster = start_cluster(log_path, agents=1, workers=2, heartbeat=args.heartbeat,
                                log_level=args.log_level)
        client = cluster.client(window=args.window)
        client.submit(fn, 0).result(timeout=30)  # warm: the function reaches both sides
        sampler = Sampler(cluster, lambda: tally["done"])
        budget = args.deadline or (60 + 3 * n * max(args.sleep_ms, 0.15) / 1000 / 2 * 1.5)
        out["deadline_s"] = round(budget, 1)
        t_deadline = now() + budget

        def watchdog() -> None:  # at the deadline, closing the client unblocks submit/map
            if not watchdog_stop.wait(budget):
                state["deadline_hit"] = True
                client.close()
        threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
        sampler.start()
        t0 = now()

        def record(dt: float) -> None:
            blocked["calls"] += 1
            if dt > BLOCKED_S:
                blocked["blocked_calls"] += 1
                blocked["blocked_s"] += dt
                blocked["max_block_s"] = max(blocked["max_block_s"], dt)

        def outcome(i: int, value: Any = None, exc: BaseException | None = None) -> None:
            if exc is not None:
                tally[f"error {type(exc).__name__}"] += 1
                tally["errors"] += 1
                return
            if seen[i]:
                tally["dup"] += 1
                return
            seen[i] = 1
            if value != expected(i):
                tally["wrong"] += 1
            tally["done"] += 1

        if variant == "submit":
            def callback(f: Any, i: int) -> None:
                try:
                    v = f.result()
                except BaseException as exc:  # noqa: BLE001
                    outcome(i, exc=exc)
                    return
                outcome(i, v)

            try:
                for i in range(n):
                    t = time.perf_counter()
                    fut = client.submit(fn, i)
                    record(time.perf_counter() - t)
                    fut.add_done_callback(lambda f, i=i: callback(f, i))
                    del fut
            except Exception as exc:  # noqa: BLE001 - the deadline closed the client, or worse
                out["submit_error"] = f"{type(exc).__name__}: {exc}"
            blocked["loop_s"] = now() - t0
            out["submitted"] = blocked["calls"]
            while tally["done"] + tally["errors"] + tally["dup"] < out["submitted"] and now() < t_deadline:
                time.sleep(0.05)
        else:
            def gen():
                yield from range(n)
            produced = 0
            try:
                it = iter(client.map(fn, gen(), chunksize=1, timeout=budget))
                while True:
                    t = time.perf_counter()
                    try:
                        v = next(it)
                    except StopIteration:
                        break
                    record(time.perf_counter() - t)
                    outcome(produced, v)
                    produced += 1
            except Exception as exc:  # noqa: BLE001
                out["map_error"] = f"{type(exc).__name__}: {exc}"
            blocked["loop_s"] = now() - t0
            out["submitted"] = n  # the map consumes the whole generator unless it broke
        out["elapsed_s"] = round(now() - t0, 2)
        watchdog_stop.set()
        sampler.stop()
        try:
            out["counters"] = cluster.status(5.0)["counters"]
        except Exception as exc:  # noqa: BLE001
            out["counters"] = {"status_error": str(exc)}
        out["broker_alive"] = cluster.broker is not None and cluster.broker.poll() is None
    except Exception as exc:  # noqa: BLE001 - reported; the cluster is still stopped below
        out["broken"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    finally:
        watchdog_stop.set()
        if sampler is not None:
            sampler.stop()
        if cluster is not None:
            stop_cluster(cluster, out)
    out["deadline_hit"] = state["deadline_hit"]
    out.update({k: tally[k] for k in ("done", "wrong", "dup", "errors")})
    out["error_types"] = {k[6:]: v for k, v in tally.items() if k.startswith("error ")}
    out["not_submitted"] = n - out.get("submitted", 0)
    out["lost"] = max(0, out.get("submitted", 0) - tally["done"] - tally["errors"])
    out["blocked"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in blocked.items()}
    if sampler is not None:
        samples = sampler.samples
        out["sample_errors"] = sampler.errors
        out["status_samples"] = sampler.status
        out["max_broker_queued"] = max((s["queued"] for s in sampler.status), default=None)
        out["max_broker_running"] = max((s["running"] for s in sampler.status), default=None)
        rss: dict[str, Any] = {}
        for role in ROLES:
            at = {f: at_fraction(samples, n, f, role) for f in (0.1, 0.5, 1.0)}
            if at[1.0] is None and samples:  # the run stopped short: use the last sample
                at[1.0] = samples[-1].get(role)
            growth = (at[1.0] - at[0.1]) / at[0.1] * 100 if at[0.1] and at[1.0] else None
            rss[role] = {"at10": at[0.1], "at50": at[0.5], "at100": at[1.0], "peak": sampler.peak(role),
                         "growth_pct": None if growth is None else round(growth, 2)}
        out["rss"] = rss
        step = max(1, len(samples) // 400)  # keep the JSON a sane size
        out["samples"] = samples[::step]
    out["log_summary"] = summarize_log(log_path, 70)
    return out


# ---------------------------------------------------------------------- report


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def verdicts(r: dict[str, Any], bar: float) -> list[tuple[str, bool, str]]:
    v: list[tuple[str, bool, str]] = []
    if "broken" in r:
        return [("benchmark ran", False, r["broken"])]
    for role in BARRED:
        g = r.get("rss", {}).get(role, {}).get("growth_pct")
        v.append((f"{role} RSS growth 10%->100% < {bar:g} %", g is not None and g < bar,
                  "no data" if g is None else f"{g:+.1f} %"))
    v.append(("lost = 0", r["lost"] == 0, str(r["lost"])))
    v.append(("every task submitted", r["not_submitted"] == 0, f"{r['not_submitted']} not submitted"))
    v.append(("wrong = 0", r["wrong"] == 0, str(r["wrong"])))
    v.append(("duplicates = 0", r["dup"] == 0, str(r["dup"])))
    v.append(("errors = 0", r["errors"] == 0, f"{r['errors']} {r['error_types'] or ''}"))
    v.append(("broker alive", bool(r.get("broker_alive")), str(r.get("broker_alive"))))
    v.append(("within deadline", not r["deadline_hit"], f"{r.get('deadline_s')} s"))
    return v


def print_report(results: list[dict[str, Any]], bar: float) -> bool:
    ok = True
    for r in results:
        print(f"\n=== variant {r['variant']}: {r['tasks']:,} tasks, workers sleep {r['sleep_ms']:g} ms ===")
        if "broken" in r:
            print(f"BROKEN: {r['broken']}\n{r.get('traceback', '')}")
        else:
            el = r.get("elapsed_s") or 0
            print(f"elapsed {el:.1f} s ({r['done'] / el if el else 0:,.0f} tasks/s); "
                  f"outcomes {r['done']:,}, errors {r['errors']}, wrong {r['wrong']}, dup {r['dup']}, lost {r['lost']}")
            for key in ("submit_error", "map_error"):
                if key in r:
                    print(f"{key}: {r[key]}")
            b = r["blocked"]
            what = "submit" if r["variant"] == "submit" else "next() of the map"
            print(f"producer blocked in {what}: {b['blocked_s']:.1f} s of {b['loop_s']:.1f} s "
                  f"({b['blocked_calls']:,} of {b['calls']:,} calls > 1 ms; longest {b['max_block_s'] * 1000:.0f} ms)")
            print(f"broker queue: max queued {r.get('max_broker_queued')}, max running {r.get('max_broker_running')} "
                  f"(status every 1 s)")
            print(f"{'RSS MiB':<10}{'10 %':>9}{'50 %':>9}{'100 %':>9}{'growth':>9}{'peak':>9}")
            for role in ROLES:
                x = r["rss"][role]
                g = "-" if x["growth_pct"] is None else f"{x['growth_pct']:+.1f}%"
                print(f"{role:<10}{mib(x['at10']):>9}{mib(x['at50']):>9}{mib(x['at100']):>9}{g:>9}{mib(x['peak']):>9}")
            print(f"broker counters: {dict(sorted(r.get('counters', {}).items()))}")
            if r.get("client_log"):
                print("producer-side zpar log records:")
                for k, c in r["client_log"][:8]:
                    print(f"  {c:>6} x {k}")
        ls = r.get("log_summary", {})
        print(f"cluster log: {ls.get('lines', 0)} lines, {ls.get('tracebacks', 0)} tracebacks ({r['log']})")
        for k, c in ls.get("top", [])[:6]:
            print(f"  {c:>6} x {k}")
        if r.get("leaked"):
            print(f"LEAKED processes after stop (killed): {r['leaked']}")
        ok = print_verdicts(verdicts(r, bar)) and ok
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="15,000 tasks per variant (under a minute in all)")
    ap.add_argument("--tasks", type=int, help="tasks per variant (default 100,000; 15,000 with --quick)")
    ap.add_argument("--sleep-ms", type=float, default=1.0, help="what each task sleeps (default 1 ms)")
    ap.add_argument("--variants", default="submit,map", help="submit,map (default both)")
    ap.add_argument("--window", type=int, default=10_000, help="the client's window (zpar's default 10,000)")
    ap.add_argument("--heartbeat", type=float, default=0.1, help="cluster heartbeat (LocalCluster's 0.1 s)")
    ap.add_argument("--log-level", default="WARNING", help="of the broker and agent (their log goes to a file)")
    ap.add_argument("--deadline", type=float, help="seconds per variant before it is cut short")
    ap.add_argument("--bar", type=float, default=10.0, help="RSS growth bar, percent (10)")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the cluster logs (kept anyway on failure)")
    args = ap.parse_args(argv)
    if args.tasks is None:
        args.tasks = 15_000 if args.quick else 100_000
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in ("submit", "map") for v in variants):
        ap.error("--variants takes submit and/or map")

    workdir = tempfile.mkdtemp(prefix="zpar-bench-bp-")
    handler = count_zpar_logs(60)
    print(f"bench_backpressure: {args.tasks:,} tasks per variant, sleep {args.sleep_ms:g} ms, "
          f"LocalCluster(agents=1, workers=2, heartbeat={args.heartbeat:g}), window {args.window:,}; "
          f"{psutil.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
    results = []
    code = 0
    try:
        for v in variants:
            handler.counts.clear()
            r = run_variant(v, args, workdir)
            r["client_log"] = handler.counts.most_common(10)
            results.append(r)
            if "broken" in r:
                code = 2
        ok = print_report(results, args.bar)
        if code == 0 and not ok:
            code = 1
    finally:
        code = finish_run(args, workdir, results, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
