#!/usr/bin/env python
"""Issue 14, futures as arguments: a large value from one task to the next, and a chain of small tasks.

    python benchmarks/bench_deps.py             # the full run: a few minutes on 2 cores
    python benchmarks/bench_deps.py --quick     # a smaller chain, fewer repetitions
    python benchmarks/bench_deps.py --only values --systems zpar,zpar-tcp --json out.json

zpar on the embedded cluster (``zpar.Client(workers=2)``) and on a TCP
cluster started from the CLIs (``zpar-broker`` + ``zpar-agent --workers 2``
on loopback, default authentication: CurveZMQ), Dask distributed
(``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``) and Ray
(``ray.init(num_cpus=2)``), all open at once, measured in one run with the
order rotated each repetition; each figure is the median, with the spread
(min-max). Three parts:

* values: ``consume(make(nbytes))`` with an array of 8 and 64 MB. zpar
  "held": ``submit(consume, submit(make, n))`` (the broker keeps the value and
  ships it to the consuming node); zpar "via producer": ``v =
  submit(make, n).result(); submit(consume, v)``; Dask and Ray pass their
  futures / object refs. Per pair: seconds, this process's CPU seconds, the
  bytes this producer's ZeroMQ socket received and sent (counted by wrapping
  the client's I/O thread's reads and writes) and the bytes it mapped from or
  wrote to shared memory (the embedded cluster's large buffers), and whether
  both tasks ran in the same worker process.
* chain: ``x = submit(g, 0); for _ in range(N): x = submit(add, x, 1)``,
  against Dask and Ray doing the same and zpar waiting for each result before
  the next submit (what users had to do before). Total and per-task time, and
  this process's thread count sampled every 5 ms during the chain.
* waiting: the chain submitted behind a first task that blocks until a file
  exists: the broker's RSS with N tasks waiting (the embedded hub holds the
  agent's core too), this process's threads, then the chain released.

After each part the broker must hold no object (``status()["objects"]``
back to 0): a kept value that outlives its tasks is reported as a leak.
Every process the run starts is killed at its end.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import psutil

# benchmarks/ is on sys.path
from _cluster import private_config_home
from _common import git_state, rotated, write_json
from _peers import SYSTEMS, ChildWatch, DaskTool, RayTool, ZparCliTool, missing

import zpar

perf = time.perf_counter
SYSTEM_KEYS = ["zpar", "zpar-tcp", "dask", "ray"]
PARTS = ["waiting", "values", "chain"]


# ----------------------------------------------------------------------------- the tasks


def make(nbytes: int) -> Any:
    """An array of ``nbytes``, every element the pid of the worker that made it (so the consumer can tell)."""
    return np.full(nbytes // 8, float(os.getpid()))


def consume(a: Any) -> tuple[float, int, float]:
    """The maker's pid, the consumer's pid, and a checksum (maker's pid times the length)."""
    return float(a[0]), os.getpid(), float(a.sum())


def zero() -> int:
    return 0


def add(x: int, y: int) -> int:
    return x + y


def gate(path: str, limit: float) -> int:
    """Returns 0 once ``path`` exists (the waiting part's first task: the chain waits behind it)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {limit} s")
        time.sleep(0.005)  # the user's task polls a file: nothing else to block on
    return 0


# ----------------------------------------------------------------------------- what the producer moved


class Moved:
    """Bytes this process's zpar clients moved: through their ZeroMQ socket (read and written by the I/O
    thread, envelope and headers included) and through shared memory (a value's buffers mapped on loading,
    placed on dumping). Installed by wrapping private functions: a benchmark's probe, not an API."""

    def __init__(self) -> None:
        self.socket_in = self.socket_out = self.shm_in = self.shm_out = 0
        self.installed: list[str] = []

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.socket_in, self.socket_out, self.shm_in, self.shm_out

    def install(self) -> None:
        from zpar import _connection, _loop, serialize

        moved = self

        class CountingReader(_loop.Reader):
            def next(self) -> Any:
                frames = super().next()
                if frames is not None:
                    moved.socket_in += sum(_size(f) for f in frames)
                return frames

        def counting_send(conn: Any, messages: list[Any]) -> None:
            from zpar import protocol as P
            for msg in messages:
                frames = P.encode(msg)
                moved.socket_out += sum(_size(f) for f in frames)
                conn.sock.send_multipart(frames, copy=False)

        setattr(_connection, "Reader", CountingReader)  # noqa: B010 - a probe over a private name
        setattr(_connection.Connection, "_send", counting_send)  # noqa: B010
        self.installed += ["socket"]
        attached, placed = getattr(serialize, "_attached", None), getattr(serialize, "_placed", None)
        if attached is not None and placed is not None:
            def counting_attached(*a: Any, **k: Any) -> Any:
                head, buffers = attached(*a, **k)
                moved.shm_in += sum(_size(b) for b in buffers)
                return head, buffers

            def counting_placed(frames: Any, *a: Any, **k: Any) -> Any:
                out = placed(frames, *a, **k)
                if out is not None:
                    moved.shm_out += sum(_size(f) for f in frames[1:])
                return out

            serialize._attached = counting_attached
            serialize._placed = counting_placed
            self.installed += ["shm"]


def _size(frame: Any) -> int:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame).nbytes


class ThreadSampler(threading.Thread):
    """This process's thread count (``threading.active_count()``, this sampler not counted) every 5 ms."""

    def __init__(self) -> None:
        super().__init__(name="thread-sampler", daemon=True)
        self.done = threading.Event()
        self.counts: list[int] = []
        self.names: list[str] = []  # the threads when the count was highest
        self.most = -1

    def run(self) -> None:
        while not self.done.wait(0.005):
            count = threading.active_count() - 1
            if count > self.most:
                self.most, self.names = count, sorted(t.name for t in threading.enumerate() if t is not self)
            self.counts.append(count)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(5)


# ----------------------------------------------------------------------------- the systems


@dataclass
class System:
    """One system under test: ``client`` (a zpar Client, a Dask Client, or the ray module) and its pids."""

    key: str
    tool: Any
    client: Any = None
    broker_pid: int | None = None

    @property
    def is_zpar(self) -> bool:
        return self.key.startswith("zpar")

    def open(self, workers: int, workdir: str) -> None:
        if self.key == "zpar":
            self.client = zpar.Client(workers=workers)
            self.client.wait_for_workers(workers, timeout=30)
            self.broker_pid = self.client._cluster.procs[0].pid  # private: the hub (broker + agent) process
        else:
            self.tool.open()
            self.client = self.tool.h[0] if self.key == "zpar-tcp" else self.tool.h
            if self.key == "zpar-tcp":
                self.broker_pid = self.tool.h[1][0].pid  # zpar-broker, started first (ZparCliTool.start)

    def close(self) -> None:
        if self.key == "zpar":
            if self.client is not None:
                self.client.close()
        else:
            self.tool.close()

    def objects(self, timeout: float = 10.0) -> dict[str, int]:
        """The broker's objects once back to 0, or what it holds after ``timeout`` s (a leak)."""
        deadline = time.monotonic() + timeout
        while True:
            got = dict(self.client.status()["objects"])
            if got.get("count") == 0 or time.monotonic() > deadline:
                return got
            time.sleep(0.05)  # polling the broker's status: nothing to wake us sooner


def remote(fn: Callable[..., Any], _cache: dict[Any, Any] = {}) -> Any:  # noqa: B006 - a cache on purpose
    import ray
    if fn not in _cache:
        _cache[fn] = ray.remote(fn)
    return _cache[fn]


def pair(system: System, mode: str, nbytes: int, timeout: float) -> tuple[float, float, int, int]:
    """``consume(make(nbytes))`` once: (maker's pid, checksum, consumer's pid, expected length)."""
    c = system.client
    if system.key == "ray":
        import ray
        got = ray.get(remote(consume).remote(remote(make).remote(nbytes)), timeout=timeout)
    elif system.key == "dask" and mode == "cross":  # each task pinned to its own worker: the value must move
        a, b = sorted(c.scheduler_info()["workers"])[:2]
        made = c.submit(make, nbytes, pure=False, workers=[a], allow_other_workers=False)
        got = c.submit(consume, made, pure=False, workers=[b], allow_other_workers=False).result(timeout=timeout)
    elif system.key == "dask":
        got = c.submit(consume, c.submit(make, nbytes, pure=False), pure=False).result(timeout=timeout)
    elif mode == "held":
        got = c.submit(consume, c.submit(make, nbytes)).result(timeout=timeout)
    else:
        v = c.submit(make, nbytes).result(timeout=timeout)
        got = c.submit(consume, v).result(timeout=timeout)
        del v
    maker, consumer, checksum = got
    return maker, checksum, consumer, nbytes // 8


def chain(system: System, mode: str, n: int, timeout: float) -> int:
    c = system.client
    if system.key == "ray":
        import ray
        radd = remote(add)
        x = remote(zero).remote()
        for _ in range(n):
            x = radd.remote(x, 1)
        return int(ray.get(x, timeout=timeout))
    if system.key == "dask":
        x = c.submit(zero, pure=False)
        for _ in range(n):
            x = c.submit(add, x, 1, pure=False)
        return int(x.result(timeout=timeout))
    x = c.submit(zero)
    for _ in range(n):
        x = c.submit(add, x, 1) if mode == "held" else c.submit(add, x.result(timeout=timeout), 1)
    return int(x.result(timeout=timeout))


# ----------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Sizes:
    mbs: tuple[int, ...] = (8, 64)
    reps: int = 7
    chain: int = 10_000
    chain_reps: int = 3
    waiting: int = 9_999  # behind the blocked one: 10,000 in flight, the client's default window (more would block)


FULL = Sizes()
QUICK = Sizes(reps=3, chain=1_000, chain_reps=2)


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "samples": values} if values else {"median": None, "n": 0}


def runners(systems: list[System]) -> list[tuple[str, System, str]]:
    """(label, system, mode): zpar both ways (held by the broker, through the producer), the peers once."""
    out = []
    for s in systems:
        if s.is_zpar:
            out += [(f"{s.key} held", s, "held"), (f"{s.key} via producer", s, "producer")]
        elif s.key == "dask":
            out += [(s.key, s, ""), ("dask cross-worker", s, "cross")]
        else:
            out.append((s.key, s, ""))
    return out


def attempt(errors: dict[str, str], label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; None, with the error noted under ``label`` for the table, if it raised."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        errors[label] = f"{type(exc).__name__}: {exc}"[:200]
        return None


def part_values(systems: list[System], sizes: Sizes, moved: Moved, timeout: float, log: Callable[[str], None]
                ) -> dict[str, Any]:
    me = psutil.Process()
    results: dict[str, Any] = {}
    runs = runners(systems)
    for mb in sizes.mbs:
        nbytes = mb * 1_000_000
        rows: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in runs}
        errors: dict[str, str] = {}
        for label, system, mode in runs:  # warm-up: each worker's first large value maps fresh memory
            for _ in range(2):
                attempt(errors, label, pair, system, mode, nbytes, timeout)
        for rep in range(sizes.reps):
            for label, system, mode in rotated(runs, rep):
                if label in errors:
                    continue
                gc.collect()
                m0, c0, t0 = moved.snapshot(), me.cpu_times(), perf()
                done = attempt(errors, label, pair, system, mode, nbytes, timeout)
                if done is None:
                    continue
                maker, checksum, consumer, length = done
                took, c1, m1 = perf() - t0, me.cpu_times(), moved.snapshot()
                if checksum != maker * length:
                    errors[label] = f"wrong checksum {checksum} != {maker} * {length}"
                    continue
                row = rows[label]
                row.setdefault("s", []).append(took)
                row.setdefault("cpu_s", []).append((c1.user + c1.system) - (c0.user + c0.system))
                row.setdefault("same_worker", []).append(float(maker == consumer))
                if system.is_zpar:
                    for i, k in enumerate(("socket_in", "socket_out", "shm_in", "shm_out")):
                        row.setdefault(k, []).append(float(m1[i] - m0[i]))
            log(f"  {mb} MB: repetition {rep + 1}/{sizes.reps} done")
        results[f"{mb}MB"] = {"rows": {label: {k: spread(v) for k, v in row.items()} for label, row in rows.items()},
                              "errors": errors}
    for s in systems:
        if s.is_zpar:
            results.setdefault("objects_after", {})[s.key] = s.objects()
    return results


def part_chain(systems: list[System], sizes: Sizes, timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    runs = [(f"{s.key} chain", s, "held") for s in systems] + \
           [(f"{s.key} wait+resubmit", s, "resubmit") for s in systems if s.is_zpar]
    n = sizes.chain
    rows: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in runs}
    errors: dict[str, str] = {}
    names: dict[str, list[str]] = {}  # each run's threads at their most, in its last repetition
    for label, system, mode in runs:  # warm-up: functions shipped, workers' caches filled
        attempt(errors, label, chain, system, mode, 50, timeout)
    for rep in range(sizes.chain_reps):
        for label, system, mode in rotated(runs, rep):
            if label in errors:
                continue
            gc.collect()
            before = threading.active_count()
            with ThreadSampler() as threads:
                t0 = perf()
                got = attempt(errors, label, chain, system, mode, n, timeout)
                if got is None:
                    continue
                took = perf() - t0
            if got != n:
                errors[label] = f"wrong result {got}, not {n}"
                continue
            row = rows[label]
            row.setdefault("s", []).append(took)
            row.setdefault("threads_before", []).append(float(before))
            row.setdefault("threads_max", []).append(float(max(threads.counts, default=before)))
            names[label] = threads.names
            log(f"  {label}: {took:.2f} s")
    out: dict[str, Any] = {"n": n, "rows": {label: {k: spread(v) for k, v in row.items()}
                                            for label, row in rows.items()}, "errors": errors,
                          "threads": names}
    for s in systems:
        if s.is_zpar:
            out.setdefault("objects_after", {})[s.key] = s.objects()
    return out


def part_waiting(system: System, n: int, workdir: str, timeout: float) -> dict[str, Any]:
    """``n`` tasks waiting at the broker behind a blocked first one: its RSS, our threads; then released."""
    c = system.client
    broker = psutil.Process(system.broker_pid)
    path = os.path.join(workdir, f"gate-{system.key}")
    submitted0 = c.status()["counters"].get("submitted", 0)
    gc.collect()
    rss0 = broker.memory_info().rss
    threads0 = threading.active_count()
    with ThreadSampler() as threads:
        t0 = perf()
        x = first = c.submit(gate, path, timeout)
        for _ in range(n):
            x = c.submit(add, x, 1)
        t_submit = perf() - t0
        deadline = time.monotonic() + timeout
        while True:  # every task at the broker (the client's window may hold some back)
            st = c.status()
            if st["counters"].get("submitted", 0) - submitted0 >= n + 1:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the broker has {st['counters'].get('submitted', 0) - submitted0} of {n + 1}")
            time.sleep(0.05)  # polling the broker's status: nothing to wake us sooner
        t_all_in = perf() - t0
        rss = max(broker.memory_info().rss for _ in range(5))
        waiting_threads = max(threads.counts, default=threads0)
        done = first.done()
        with open(path, "w"):
            pass
        t1 = perf()
        got = x.result(timeout=timeout)
        t_run = perf() - t1
    os.unlink(path)
    return {"n": n, "broker_pid": system.broker_pid, "broker_rss_before_mib": rss0 / 2**20,
            "broker_rss_waiting_mib": rss / 2**20, "bytes_per_waiting_task": (rss - rss0) / n,
            "status_queued": st.get("queued"), "first_done_while_waiting": done,
            "threads_before": threads0, "threads_max_while_waiting": waiting_threads,
            "threads_max": max(threads.counts, default=threads0), "thread_names": threads.names,
            "submit_s": t_submit, "all_in_s": t_all_in,
            "released_chain_s": t_run, "result_ok": got == n, "objects_after": system.objects()}


# ----------------------------------------------------------------------------- report


def fmt_s(x: dict[str, Any]) -> str:
    if not x.get("n"):
        return "-"
    return f"{x['median']:.3f} s ({x['min']:.3f}-{x['max']:.3f})"


def mb(x: dict[str, Any] | None) -> str:
    return "-" if not x or not x.get("n") else f"{x['median'] / 1e6:.1f}"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or not a.get("n") or not b.get("n"):
        return "-"
    return f"{a['median'] / b['median']:.2f} ({a['min'] / b['max']:.2f}-{a['max'] / b['min']:.2f})"


def report_values(res: dict[str, Any]) -> str:
    lines = []
    for size, part in res.items():
        if not size.endswith("MB"):
            continue
        rows = part["rows"]
        lines += [(f"\n**{size} value** (s per pair: median (min-max); MB this producer's socket received / sent; "
                  "MB mapped from / placed in shared memory; CPU s of this process; pairs on one worker)\n"),
                  "| system | s per pair | socket in / out MB | shm in / out MB | producer CPU s | same worker |",
                  "|---|---|---|---|---|---|"]
        for label, row in rows.items():
            if not row.get("s", {}).get("n"):
                lines.append(f"| {label} | {part['errors'].get(label, '-')} | | | | |")
                continue
            sock = f"{mb(row.get('socket_in'))} / {mb(row.get('socket_out'))}" if "socket_in" in row else "n/a"
            shm = f"{mb(row.get('shm_in'))} / {mb(row.get('shm_out'))}" if "shm_in" in row else "n/a"
            lines.append(f"| {label} | {fmt_s(row['s'])} | {sock} | {shm} | {row['cpu_s']['median']:.3f} | "
                         f"{sum(row['same_worker']['samples']):.0f}/{row['same_worker']['n']} |")
        lines += ["", "| ratio (of s per pair; median (min/max - max/min)) | value |", "|---|---|"]
        for z in ("zpar", "zpar-tcp"):
            held, via = rows.get(f"{z} held", {}).get("s"), rows.get(f"{z} via producer", {}).get("s")
            lines.append(f"| {z} held / {z} via producer | {ratio(held, via)} |")
            for peer in ("dask", "dask cross-worker", "ray"):
                lines.append(f"| {z} held / {peer} | {ratio(held, rows.get(peer, {}).get('s'))} |")
    if "objects_after" in res:
        lines.append(f"\nbroker objects after the pairs: {res['objects_after']}")
    return "\n".join(lines)


def report_chain(res: dict[str, Any]) -> str:
    n = res["n"]
    rows = res["rows"]
    lines = [(f"\n**chain of {n:,} tasks** (total s: median (min-max); per task; this process's threads before / "
             "most seen during)\n"), "| system | total | per task | threads before / max |", "|---|---|---|---|"]
    for label, row in rows.items():
        if not row.get("s", {}).get("n"):
            lines.append(f"| {label} | {res['errors'].get(label, '-')} | | |")
            continue
        lines.append(f"| {label} | {fmt_s(row['s'])} | {row['s']['median'] / n * 1e6:.0f} us | "
                     f"{row['threads_before']['median']:.0f} / {row['threads_max']['max']:.0f} |")
    lines += ["", "| ratio (of total time) | value |", "|---|---|"]
    for z in ("zpar", "zpar-tcp"):
        held = rows.get(f"{z} chain", {}).get("s")
        for other in (f"{z} wait+resubmit", "dask chain", "ray chain"):
            lines.append(f"| {z} chain / {other} | {ratio(held, rows.get(other, {}).get('s'))} |")
    for label in ("zpar chain", "zpar-tcp chain"):
        if res.get("threads", {}).get(label):
            lines.append(f"\nthreads at their most during the {label}: {', '.join(res['threads'][label])}")
    if "objects_after" in res:
        lines.append(f"\nbroker objects after the chains: {res['objects_after']}")
    return "\n".join(lines)


def report_waiting(res: dict[str, Any]) -> str:
    lines = ["\n**tasks waiting at the broker**\n",
             ("| cluster | tasks waiting | broker RSS before / waiting | per waiting task | producer threads "
             "before / max | submit s | released chain s | objects after |"), "|---|---|---|---|---|---|---|---|"]
    for key, r in res.items():
        if "error" in r:
            lines.append(f"| {key} | {r['error']} | | | | | | |")
            continue
        lines.append(f"| {key} | {r['n']:,} | {r['broker_rss_before_mib']:.1f} / {r['broker_rss_waiting_mib']:.1f} "
                     f"MiB | {r['bytes_per_waiting_task']:.0f} B | {r['threads_before']} / {r['threads_max']} | "
                     f"{r['submit_s']:.2f} | {r['released_chain_s']:.2f} | {r['objects_after']} |")
    for key, r in res.items():
        if r.get("thread_names"):
            lines.append(f"\nthreads at their most while {key}'s tasks waited or ran: {', '.join(r['thread_names'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a chain of 1,000, fewer repetitions")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", metavar="LIST", default="", help="parts: " + ",".join(PARTS))
    parser.add_argument("--systems", metavar="LIST", default="", help="systems: " + ",".join(SYSTEM_KEYS))
    parser.add_argument("--chain", type=int, help="the chain's length (default 10,000; 1,000 with --quick)")
    parser.add_argument("--waiting", type=int, help="tasks waiting behind the blocked one (default 9,999)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one measurement may take")
    parser.add_argument("--json", metavar="PATH", help="also write every sample here")
    args = parser.parse_args(argv)
    parts = [p for p in PARTS if not args.only or p in args.only.split(",")]
    keys = [k for k in SYSTEM_KEYS if not args.systems or k in args.systems.split(",")]
    unknown = (set(filter(None, args.only.split(","))) - set(PARTS)) | \
              (set(filter(None, args.systems.split(","))) - set(SYSTEM_KEYS))
    if unknown:
        parser.error(f"unknown part or system: {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    if args.chain:
        sizes = dataclasses.replace(sizes, chain=args.chain)
    if args.waiting:
        sizes = dataclasses.replace(sizes, waiting=args.waiting)

    def log(text: str) -> None:
        print(f"[{perf() - started:5.0f} s] {text}", file=sys.stderr, flush=True)

    started = perf()
    workdir = tempfile.mkdtemp(prefix="zpar-bench-deps-")
    private_config_home()  # the TCP cluster's own per-user secret: not the caller's
    moved = Moved()
    moved.install()
    peers = {s.key: s for s in SYSTEMS}
    systems: list[System] = []
    notes: list[str] = []
    for key in keys:
        why = missing(peers[key]) if key in peers and key != "zpar" else None
        if why:
            notes.append(f"{key} skipped: {why}")
            continue
        tool = {"zpar-tcp": lambda: ZparCliTool(args.workers, os.path.join(workdir, "daemons.log")),
                "dask": lambda: DaskTool(args.workers), "ray": lambda: RayTool(args.workers)}.get(key, lambda: None)()
        systems.append(System(key, tool))
    git = git_state()
    log(f"bench_deps: {'quick' if args.quick else 'full'} run; {', '.join(s.key for s in systems)}; parts "
        f"{', '.join(parts)}; zpar at {(git['commit'] or '?')[:10]}{' (modified)' if git['dirty'] else ''}")
    watch = ChildWatch()
    watch.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below kills what we started
    results: dict[str, Any] = {}
    opened: list[System] = []
    try:
        for s in sorted(systems, key=lambda s: s.key in ("dask", "ray")):  # zpar's forkless first, then threads
            log(f"opening {s.key} ...")
            s.open(args.workers, workdir)
            opened.append(s)
        zpars = [s for s in systems if s.is_zpar]
        if "waiting" in parts:
            results["waiting"] = {}
            for s in zpars:
                log(f"waiting: {sizes.waiting:,} tasks behind a blocked one on {s.key} ...")
                try:
                    results["waiting"][s.key] = part_waiting(s, sizes.waiting, workdir, args.timeout)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    results["waiting"][s.key] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        if "values" in parts:
            log("values ...")
            results["values"] = part_values(systems, sizes, moved, args.timeout, log)
        if "chain" in parts:
            log(f"chain of {sizes.chain:,} ...")
            results["chain"] = part_chain(systems, sizes, args.timeout, log)
    finally:
        for s in reversed(opened):
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001 - the rest must still be closed
                log(f"closing {s.key} failed: {exc}")
        left = watch.kill_all()
        if left:
            print(f"stopped {len(left)} processes still running at the end: {sorted(set(left.values()))}",
                  file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)  # its gates and the daemons' log

    elapsed = perf() - started
    meta = {"zpar_git": git, "workers": args.workers, "quick": args.quick, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "systems": [s.key for s in systems], "skipped": notes,
            "probes": moved.installed, "elapsed_s": round(elapsed, 1),
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = [(f"bench_deps ({meta['time']}, {'quick' if args.quick else 'full'} run, {elapsed:.0f} s, zpar "
            f"{(git['commit'] or '?')[:10]}{' modified' if git['dirty'] else ''}, {args.workers} workers each)")]
    if "waiting" in results:
        text.append(report_waiting(results["waiting"]))
    if "values" in results:
        text.append(report_values(results["values"]))
    if "chain" in results:
        text.append(report_chain(results["chain"]))
    print("\n".join(text + notes))
    if args.json:
        write_json(args.json, {"meta": meta, "results": results})
    failed = any(p.get("errors") for p in results.values() if isinstance(p, dict)) or \
        any("error" in r or not r.get("result_ok") for r in results.get("waiting", {}).values())
    leaks = [v for p in results.values() for v in (p.get("objects_after", {}) or {}).values()
             if isinstance(v, dict) and v.get("count")]
    leaks += [r["objects_after"] for r in results.get("waiting", {}).values()
              if r.get("objects_after", {}).get("count")]
    if leaks:
        print(f"LEAK: the broker still holds objects after the tasks ended: {leaks}")
    return 1 if failed or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
