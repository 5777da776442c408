#!/usr/bin/env python
"""Core benchmarks: zpar against multiprocessing.Pool and ProcessPoolExecutor.

    python benchmarks/bench_core.py [--quick] [--workers W] [--json out.json]

Every tool is measured in the same run, on the same machine, with repetitions
interleaved (the order of the tools rotates on each repetition), and each
figure is reported next to its ratio to ``multiprocessing.Pool``: the cores of
the machines this runs on change speed from run to run, so only ratios taken
in one run mean anything. loky and joblib are added when importable.

Measures (see benchmarks/README.md):

1. submit     tiny tasks submitted one at a time, then all gathered (tasks/s)
2. map        tiny tasks through ``map`` with the same chunksize for all (tasks/s)
3. latency    one task at a time, submit and wait (p50 / p99, microseconds)
4. cpu        a pure-Python CPU-bound function, 8*W calls: serial time / parallel time
5. numpy      a 50 MB array sent to a worker and returned (MB/s, both directions counted)
6. start-up   pool/client creation to the first result back (seconds, fresh pools)
7. stream     one task streams many tiny items back (items/s): zpar, a generator yielding
              ints (``fut.stream()``), embedded and over TCP (broker + agent); in the Pool
              column, a multiprocessing.Process putting each int on a multiprocessing.Queue

The tiny task and the CPU-bound one live in benchmarks/_tasks.py, which
every tool's workers import: all of them get them by reference. ``echo`` lives
here: multiprocessing pickles it by reference, zpar ships it by value
(cloudpickle) since it lives in ``__main__``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import gc
import importlib.util
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# benchmarks/ is on sys.path
from _common import git_state, rotated, write_json
from _tasks import calibrate, noop, sum_primes

import zpar  # imported here, so its import time is not counted in the start-up figure

try:
    from rich.console import Console
    from rich.table import Table
except ImportError:  # pragma: no cover - rich is a zpar dependency
    Console = Table = None  # type: ignore[assignment,misc]

perf = time.perf_counter

# ---------------------------------------------------------------------------
# Task functions (noop and sum_primes come from _tasks)


def echo(arr):
    """Returns the array it was given: the array crosses twice."""
    return arr


def count_up(n):
    """The streaming task: yields 0 .. n-1, one tiny item each, and returns n."""
    yield from range(n)
    return n


def put_each(queue, n):
    """multiprocessing's stream: each int on the queue, then None."""
    put = queue.put
    for i in range(n):
        put(i)
    put(None)


# ---------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Sizes:
    reps: int  # interleaved repetitions of each throughput / speed measure
    submit_n: int
    map_n: dict[int, int]  # chunksize -> number of items
    latency_n: int
    latency_block: int
    cpu_ms: float  # target duration of one CPU-bound call, serially
    cpu_calls_per_worker: int
    cpu_reps: int  # cheap and its bar is tight: more repetitions than the others
    array_mb: int
    array_reps: int
    startup_reps: int
    stream_n: int = 1_000_000  # items one streaming task yields


QUICK = Sizes(reps=3, submit_n=4000, map_n={100: 100_000, 1: 4000}, latency_n=400, latency_block=100,
              cpu_ms=50, cpu_calls_per_worker=8, cpu_reps=3, array_mb=50, array_reps=3, startup_reps=3,
              stream_n=200_000)
FULL = Sizes(reps=3, submit_n=20_000, map_n={100: 500_000, 1: 20_000}, latency_n=1000, latency_block=100,
             cpu_ms=80, cpu_calls_per_worker=8, cpu_reps=5, array_mb=50, array_reps=5, startup_reps=5)


# ---------------------------------------------------------------------------
# Tool adapters: the same five operations over each library


class Tool:
    name = "?"
    has_startup = True

    def __init__(self, workers: int) -> None:
        self.workers = workers

    # A fresh instance: ``start`` creates it, ``first`` gets one result, ``stop`` closes it.
    def start(self) -> Any: raise NotImplementedError
    def first(self, h: Any) -> Any: raise NotImplementedError
    def stop(self, h: Any) -> None: raise NotImplementedError

    def abort(self, h: Any) -> None:
        """Tears ``h`` down without waiting for its work (after a hang)."""
        self.stop(h)

    def diagnose(self, h: Any) -> dict[str, Any]:
        """What a stuck instance looks like, for the report (best effort)."""
        return {}

    h: Any = None  # the long-lived instance, between open() and close()
    fresh: Any = None  # an instance being started by the start-up measure

    def open(self) -> None:
        self.h = self.start()

    def close(self) -> None:
        h, self.h = self.h, None
        if h is not None:
            self.stop(h)

    def submit_all(self, fn: Callable, args: list) -> list: raise NotImplementedError
    def map(self, fn: Callable, items: list, chunksize: int) -> list: raise NotImplementedError
    def call(self, fn: Callable, arg: Any) -> Any: raise NotImplementedError
    def stream(self, n: int) -> int: raise NotImplementedError  # items back, counted


class FuturesTool(Tool):
    """A tool with ``submit(fn, arg)`` returning a future and ``map(fn, items, chunksize=)``."""

    def first(self, h):
        return h.submit(noop, 1).result()

    def submit_all(self, fn, args):
        submit = self.h.submit
        futs = [submit(fn, a) for a in args]
        return [f.result() for f in futs]

    def map(self, fn, items, chunksize):
        return list(self.h.map(fn, items, chunksize=chunksize))

    def call(self, fn, arg):
        return self.h.submit(fn, arg).result()


class ZparTool(FuturesTool):
    name = "zpar"

    def start(self):
        return zpar.Client(workers=self.workers)

    def stop(self, h):
        h.close()  # also the abort: cancels every pending future and stops the embedded cluster

    def stream(self, n):
        fut = self.h.submit(count_up, n)
        count = 0
        for _ in fut.stream():
            count += 1
        if fut.result() != n:
            raise AssertionError("wrong result")
        return count

    def diagnose(self, h):
        """The client's I/O state, the broker's counters, and (BENCH_PYSPY=1) stack dumps."""
        info: dict[str, Any] = {}
        io = getattr(h, "_io", None)
        if io is not None:  # private attributes, read only to explain a hang
            info["client"] = {"io_alive": io.is_alive(), "woken_flag": getattr(io, "_woken", None),
                              "queued_in_client": len(getattr(h, "_submits", ())),
                              "in_flight": len(getattr(getattr(io, "core", None), "pending", ()))}
        try:
            st = h.status(2.0)
            info["broker"] = {k: st.get(k) for k in ("queued", "running", "done", "failed", "workers", "busy")}
            info["broker"]["nodes"] = [{k: n.get(k) for k in ("busy", "running", "credits")} for n in st["nodes"]]
        except Exception as exc:  # noqa: BLE001
            info["broker"] = f"no status: {exc}"
        if os.environ.get("BENCH_PYSPY"):
            cluster = getattr(h, "_cluster", None)
            pids = [os.getpid()] + [p.pid for p in getattr(cluster, "procs", [])]
            try:
                import psutil
                pids += [c.pid for pid in pids[1:] for c in psutil.Process(pid).children(recursive=True)]
            except Exception as exc:  # noqa: BLE001 - the workers' dumps are a bonus
                info["children"] = f"not listed: {exc}"
            spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            dumps = {}
            for pid in pids:
                try:
                    done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                                          timeout=20, check=False)
                    dumps[pid] = done.stdout or done.stderr
                except (OSError, subprocess.SubprocessError) as exc:
                    dumps[pid] = str(exc)
            info["py-spy"] = dumps
        return info


class PoolTool(Tool):
    name = "Pool"

    def __init__(self, workers, context=None):
        super().__init__(workers)
        self.ctx = context or mp.get_context()

    def start(self):
        return self.ctx.Pool(self.workers)

    def first(self, h):
        return h.apply(noop, (1,))

    def stop(self, h):
        h.close()
        h.join()

    def abort(self, h):
        h.terminate()

    def submit_all(self, fn, args):
        apply_async = self.h.apply_async
        asyncs = [apply_async(fn, (a,)) for a in args]
        return [r.get() for r in asyncs]

    def map(self, fn, items, chunksize):
        return self.h.map(fn, items, chunksize=chunksize)

    def call(self, fn, arg):
        return self.h.apply(fn, (arg,))

    def stream(self, n):
        # A pool's task cannot stream: the stdlib's way is a process putting each item on a Queue.
        queue = self.ctx.Queue()
        proc = self.ctx.Process(target=put_each, args=(queue, n), daemon=True)
        proc.start()
        get = queue.get
        count = 0
        while get() is not None:
            count += 1
        proc.join()
        return count


class ZparTcpTool(ZparTool):
    """zpar through a broker and an agent over loopback TCP (CurveZMQ), one hop more than embedded."""

    name = "zpar-tcp"
    config_home: str | None = None  # made once for the run (every instance and reopening shares it)

    def start(self):
        import tempfile

        from _cluster import private_config_home, start_cluster
        if ZparTcpTool.config_home is None:  # this user's secret made for the run, never the caller's own
            ZparTcpTool.config_home = private_config_home()
        cluster = start_cluster(os.path.join(tempfile.gettempdir(), f"bench-core-tcp-{os.getpid()}.log"),
                                agents=1, workers=self.workers, heartbeat=1.0)
        client = cluster.client()
        client._bench_cluster = cluster  # stopped with it
        return client

    def stop(self, h):
        h._bench_cluster.stop()  # closes its clients (h) first


class ExecutorTool(FuturesTool):
    name = "PPE"

    def __init__(self, workers, context=None):
        super().__init__(workers)
        self.ctx = context or mp.get_context()

    def start(self):
        return cf.ProcessPoolExecutor(self.workers, mp_context=self.ctx)

    def stop(self, h):
        h.shutdown(wait=True)

    def abort(self, h):
        procs = list((getattr(h, "_processes", None) or {}).values())
        h.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.kill()


class LokyTool(ExecutorTool):
    name = "loky"

    def start(self):
        import loky
        # A fresh executor each time (get_reusable_executor would hand back a warm one).
        return loky.ProcessPoolExecutor(self.workers)


class JoblibTool(Tool):
    """joblib.Parallel has no submit; it takes part in map, cpu and numpy."""

    name = "joblib"
    has_startup = False  # its loky workers are reused across Parallel calls: no fresh start to time

    def start(self):
        import joblib
        return joblib

    def first(self, h):
        return h.Parallel(n_jobs=self.workers)([h.delayed(noop)(1)])[0]

    def stop(self, h):
        try:
            from joblib.externals.loky import get_reusable_executor
            get_reusable_executor().shutdown(wait=True)
        except Exception as exc:  # noqa: BLE001 - best effort at the very end
            print(f"joblib: shutting its loky executor down failed: {exc}", file=sys.stderr)

    def submit_all(self, fn, args):
        raise NotImplementedError("joblib has no one-at-a-time submit")

    def map(self, fn, items, chunksize):
        jl = self.h
        return jl.Parallel(n_jobs=self.workers, batch_size=chunksize)(jl.delayed(fn)(x) for x in items)

    def call(self, fn, arg):
        jl = self.h
        return jl.Parallel(n_jobs=self.workers)([jl.delayed(fn)(arg)])[0]


# ---------------------------------------------------------------------------
# Results


@dataclass
class Row:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    figures: dict[str, float | None] = field(default_factory=dict)  # tool -> figure
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    hangs: dict[str, int] = field(default_factory=dict)  # tool -> measurements that never finished
    attempts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    fmt: Callable[[float], str] = str
    note: str = ""

    def add(self, tool: str, value: float) -> None:
        self.samples.setdefault(tool, []).append(value)

    def fail(self, tool: str, exc: BaseException) -> None:
        self.errors.setdefault(tool, f"{type(exc).__name__}: {exc}".splitlines()[0][:160])

    def ratio(self, tool: str, peer: str = "Pool") -> float | None:
        a, b = self.figures.get(tool), self.figures.get(peer)
        if a is None or b is None or b == 0:
            return None
        return a / b

    def to_json(self) -> dict[str, Any]:
        """The row as the JSON report has it."""
        return {"title": self.title, "unit": self.unit, "higher_is_better": self.higher_is_better,
                "figures": self.figures, "ratio_to_pool": {t: self.ratio(t) for t in self.figures},
                "samples": self.samples, "errors": self.errors, "hangs": self.hangs, "attempts": self.attempts,
                "extra": self.extra, "note": self.note}


@dataclass
class Bar:
    row: str
    text: str
    check: Callable[[Row], tuple[float | None, bool]]  # (value checked, passed)


def best(values: list[float], higher_is_better: bool) -> float:
    return max(values) if higher_is_better else min(values)


def rate(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M/s"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k/s"
    return f"{n:.0f}/s"


def micro(us: float) -> str:
    return f"{us:,.0f} us"


def secs(s: float) -> str:
    return f"{s * 1e3:,.0f} ms" if s < 10 else f"{s:.1f} s"


def times(x: float) -> str:
    return f"{x:.2f}x"


def mbps(x: float) -> str:
    return f"{x:,.0f} MB/s"


# ---------------------------------------------------------------------------
# Runner


class Bench:
    def __init__(self, sizes: Sizes, workers: int, console: Any, timeout: float) -> None:
        self.sizes = sizes
        self.workers = workers
        self.console = console
        self.timeout = timeout
        self.hangs: list[dict[str, Any]] = []
        self.rows: dict[str, Row] = {}
        self.tools: list[Tool] = []

    def log(self, text: str, style: str | None = None) -> None:
        if self.console is not None:
            self.console.log(text, style=style, markup=False, highlight=False, _stack_offset=2)
        else:
            print(text, file=sys.stderr, flush=True)

    def row(self, key: str, **kw: Any) -> Row:
        row = self.rows[key] = Row(key, **kw)
        return row

    @staticmethod
    def rotations(tools: list[Tool], reps: int):
        """Each repetition runs every tool once; the order rotates so none is always first."""
        return (rotated(tools, rep) for rep in range(reps))

    def guarded(self, row: Row, tool: Tool, fn: Callable[[], Any], what: str = "measurement") -> Any:
        """Runs ``fn`` under a deadline; returns its value, or None if it failed or hung.

        An exception marks the tool's figure on this row as an error (the run
        goes on). ``fn`` runs in a helper thread so that a tool that never
        answers cannot stop the run: after ``timeout`` seconds the tool's pool
        is torn down, counted as a hang on this row, and a fresh one is opened
        for what follows. Timing is taken inside ``fn``, so the thread costs
        nothing measured.
        """
        if tool.name in row.errors:
            return None
        row.attempts[tool.name] = row.attempts.get(tool.name, 0) + 1
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported below, in the main thread
                box["error"] = exc
                box["tb"] = traceback.format_exc()

        runner = threading.Thread(target=target, name=f"bench-{tool.name}", daemon=True)
        runner.start()
        runner.join(self.timeout)
        if runner.is_alive():
            row.hangs[tool.name] = row.hangs.get(tool.name, 0) + 1
            stuck = tool.fresh if tool.fresh is not None else tool.h
            try:
                state = tool.diagnose(stuck) if stuck is not None else {}
            except Exception as exc:  # noqa: BLE001
                state = {"diagnose_failed": str(exc)}
            self.hangs.append({"measure": row.key, "tool": tool.name, "what": what, "timeout_s": self.timeout,
                               "state": state})
            self.log(f"{row.title}: {tool.name} {what} HUNG: nothing for {self.timeout:g} s; "
                     f"tearing its pool down and opening a fresh one", "bold red")
            if state:
                self.log(f"state when stuck: { {k: v for k, v in state.items() if k != 'py-spy'} }")
                for pid, dump in state.get("py-spy", {}).items():
                    print(f"--- py-spy dump of pid {pid}\n{dump}", file=sys.stderr)
            self.recover(tool)
            runner.join(10)
            return None
        if "error" in box:
            exc = box["error"]
            if isinstance(exc, KeyboardInterrupt):
                raise exc
            row.fail(tool.name, exc)
            self.log(f"{row.title}: {tool.name} failed: {type(exc).__name__}: {exc}".splitlines()[0], "red")
            if os.environ.get("BENCH_TRACEBACK"):
                print(box["tb"], file=sys.stderr)
            return None
        return box.get("value")

    def recover(self, tool: Tool) -> None:
        """After a hang: abort the stuck instance; reopen the long-lived one if it was that."""
        stuck, tool.fresh = tool.fresh, None
        persistent = stuck is None
        if persistent:
            stuck, tool.h = tool.h, None
        if stuck is not None:
            try:
                tool.abort(stuck)
            except Exception as exc:  # noqa: BLE001
                self.log(f"aborting {tool.name} failed: {exc}")
        if persistent and stuck is not None:
            try:
                tool.open()
                tool.first(tool.h)
            except Exception as exc:  # noqa: BLE001
                self.log(f"reopening {tool.name} failed: {exc}", "red")

    def sample(self, row: Row, tools: list[Tool], reps: int, once: Callable[[Tool], float]) -> None:
        """``reps`` repetitions, each ``once(tool)`` for every tool in rotated order, guarded; adds each figure."""
        for order in self.rotations(tools, reps):
            for tool in order:
                r = self.guarded(row, tool, functools.partial(once, tool))
                if r is not None:
                    row.add(tool.name, r)

    @staticmethod
    def finish(row: Row) -> None:
        for tool, values in row.samples.items():
            if tool not in row.errors and values:
                row.figures[tool] = best(values, row.higher_is_better)

    # ------------------------------------------------------------------ 6. start-up

    def bench_startup(self, tools: list[Tool], spawn_tools: list[Tool]) -> None:
        s = self.sizes
        row = self.row("startup", title="start-up to first result", unit="s", higher_is_better=False, fmt=secs,
                       note=f"fresh pool each time, median of {s.startup_reps}; peers use the "
                            f"'{mp.get_start_method()}' start method")
        srow = self.row("startup_spawn", title="start-up, peers with spawn", unit="s", higher_is_better=False,
                        fmt=secs, note="same zpar figure; Pool/PPE with the 'spawn' context "
                                       "(fresh interpreters, as zpar's workers are)")
        closing: dict[str, list[float]] = {}
        every = [t for t in tools if t.has_startup] + spawn_tools
        for order in self.rotations(every, s.startup_reps):
            for tool in order:
                target = srow if tool in spawn_tools else row

                def once(tool=tool):
                    gc.collect()
                    t0 = perf()
                    h = tool.fresh = tool.start()
                    try:
                        if tool.first(h) != 1:
                            raise AssertionError("wrong result")
                    except BaseException:
                        tool.fresh = None
                        tool.abort(h)
                        raise
                    t1 = perf()
                    tool.fresh = None
                    tc = perf()
                    tool.stop(h)
                    closing.setdefault(tool.name, []).append(perf() - tc)
                    return t1 - t0

                took = self.guarded(target, tool, once)
                if took is not None:
                    target.add(tool.name, took)
        for r in (row, srow):
            for tool, values in r.samples.items():
                if tool not in r.errors:
                    r.figures[tool] = statistics.median(values)
        if "zpar" in row.figures:
            srow.figures["zpar"] = row.figures["zpar"]
        row.extra["close_s_median"] = {k: statistics.median(v) for k, v in closing.items()}

    # ------------------------------------------------------------------ 1. submit

    def bench_submit(self, tools: list[Tool]) -> None:
        s = self.sizes
        tools = [t for t in tools if not isinstance(t, JoblibTool)]
        row = self.row("submit", title="submit one at a time, tiny tasks", unit="tasks/s", higher_is_better=True,
                       fmt=rate, note=f"{s.submit_n:,} no-op tasks submitted one by one (Pool: apply_async), "
                                      f"then gathered; best of {s.reps}")
        args = list(range(s.submit_n))
        warm = args[: max(200, s.submit_n // 10)]
        for tool in tools:
            self.guarded(row, tool, lambda tool=tool: tool.submit_all(noop, warm), "warm-up")

        def once(tool):
            gc.collect()
            t0 = perf()
            out = tool.submit_all(noop, args)
            took = perf() - t0
            if out != args:
                raise AssertionError("wrong results")
            return s.submit_n / took

        self.sample(row, tools, s.reps, once)
        self.finish(row)

    # ------------------------------------------------------------------ 2. map

    def bench_map(self, tools: list[Tool]) -> None:
        s = self.sizes
        for chunksize, n in s.map_n.items():
            row = self.row(f"map_c{chunksize}", title=f"map, tiny tasks, chunksize={chunksize}", unit="tasks/s",
                           higher_is_better=True, fmt=rate,
                           note=f"{n:,} no-op tasks, same chunksize for all; best of {s.reps}")
            items = list(range(n))
            warm = items[: max(chunksize * 4 * self.workers, n // 20)]
            for tool in tools:
                self.guarded(row, tool, lambda tool=tool, warm=warm, cs=chunksize: tool.map(noop, warm, cs),
                             "warm-up")

            def once(tool, items=items, chunksize=chunksize, n=n):
                gc.collect()
                t0 = perf()
                out = tool.map(noop, items, chunksize)
                took = perf() - t0
                if out != items:
                    raise AssertionError(f"wrong results ({len(out)} of {len(items)} items back)")
                return n / took

            self.sample(row, tools, s.reps, once)
            self.finish(row)

    # ------------------------------------------------------------------ 7. stream

    def bench_stream(self, tools: list[Tool]) -> None:
        s = self.sizes
        n = s.stream_n
        row = self.row("stream", title="stream of tiny items from one task", unit="items/s", higher_is_better=True,
                       fmt=rate, note=f"{n:,} ints: zpar, one generator task read with fut.stream(); in the Pool "
                                      "column, a multiprocessing.Process putting each int on a "
                                      f"multiprocessing.Queue (a pool's task cannot stream); best of {s.reps}, "
                                      "every sample in the JSON")
        for tool in tools:
            self.guarded(row, tool, lambda tool=tool: tool.stream(n // 10), "warm-up")

        def once(tool):
            gc.collect()
            t0 = perf()
            got = tool.stream(n)
            took = perf() - t0
            if got != n:
                raise AssertionError(f"{got} of {n} items back")
            return n / took

        self.sample(row, tools, s.reps, once)
        self.finish(row)
        row.extra["spread"] = {t: [min(v), max(v)] for t, v in row.samples.items() if v}

    # ------------------------------------------------------------------ 3. latency

    def bench_latency(self, tools: list[Tool], key: str = "latency", title: str = "round trip") -> None:
        s = self.sizes
        tools = [t for t in tools if not isinstance(t, JoblibTool)]
        note = (f"{s.latency_n} round trips each (submit, wait), after warm-up, in blocks of "
                f"{s.latency_block} interleaved across tools")
        p50 = self.row(f"{key}_p50", title=f"{title} p50", unit="us", higher_is_better=False, fmt=micro, note=note)
        p99 = self.row(f"{key}_p99", title=f"{title} p99", unit="us", higher_is_better=False, fmt=micro, note="")
        for tool in tools:
            def warm(tool=tool):
                for i in range(100):
                    tool.call(noop, i)
            self.guarded(p50, tool, warm, "warm-up")
        samples: dict[str, list[float]] = {t.name: [] for t in tools}
        blocks = max(1, s.latency_n // s.latency_block)
        for order in self.rotations(tools, blocks):
            for tool in order:
                def block(tool=tool):
                    out = []
                    call = tool.call
                    for i in range(s.latency_block):
                        t0 = perf()
                        if call(noop, i) != i:
                            raise AssertionError("wrong result")
                        out.append(perf() - t0)
                    return out

                r = self.guarded(p50, tool, block, "block of round trips")
                if r is not None:
                    samples[tool.name].extend(r)
        for name, values in samples.items():
            if name in p50.errors or not values:
                continue
            values.sort()
            p50.figures[name] = statistics.median(values) * 1e6
            p99.figures[name] = values[min(len(values) - 1, int(len(values) * 0.99))] * 1e6
        p99.errors.update(p50.errors)
        p99.hangs.update(p50.hangs)

    # ------------------------------------------------------------------ 4. cpu

    def bench_cpu(self, tools: list[Tool]) -> None:
        s = self.sizes
        n, one = calibrate(s.cpu_ms / 1e3)
        calls = s.cpu_calls_per_worker * self.workers
        row = self.row("cpu", title="CPU-bound speed-up", unit="x", higher_is_better=True, fmt=times,
                       note=f"{calls} calls of sum_primes({n:,}) (~{one * 1e3:.0f} ms each serially); "
                            f"speed-up = best serial time / best parallel time (map, chunksize=1) of {s.cpu_reps}, "
                            f"ideal {self.workers}x")
        items = [n] * calls
        expected = sum_primes(n)
        for tool in tools:  # warm-up with this very function (zpar sizes batches from its duration)
            self.guarded(row, tool, lambda tool=tool: tool.map(sum_primes, items[: self.workers], 1), "warm-up")
        serial: list[float] = []
        parallel: dict[str, list[float]] = {}
        for order in self.rotations(tools, s.cpu_reps):
            gc.collect()
            t0 = perf()
            for x in items:
                sum_primes(x)
            serial.append(perf() - t0)
            for tool in order:
                def once(tool=tool):
                    gc.collect()
                    t0 = perf()
                    out = tool.map(sum_primes, items, 1)
                    took = perf() - t0
                    if out != [expected] * calls:
                        raise AssertionError("wrong results")
                    return took

                took = self.guarded(row, tool, once)
                if took is not None:
                    parallel.setdefault(tool.name, []).append(took)
        base = min(serial)
        for name, values in parallel.items():
            if name not in row.errors:
                row.samples[name] = [base / v for v in values]
                row.figures[name] = base / min(values)
        row.extra = {"n": n, "calls": calls, "serial_s": serial, "parallel_s": parallel}

    # ------------------------------------------------------------------ 5. numpy

    def bench_numpy(self, tools: list[Tool]) -> None:
        s = self.sizes
        nbytes = s.array_mb * 1_000_000
        arr = np.arange(nbytes // 8, dtype=np.float64)
        row = self.row("numpy", title=f"{s.array_mb} MB NumPy argument + result", unit="MB/s",
                       higher_is_better=True, fmt=mbps,
                       note=f"echo(arr) on a {s.array_mb} MB float64 array; {2 * s.array_mb} MB counted per call "
                            f"(there and back); median of {s.array_reps} (best in the JSON)")
        tools = sorted(tools, key=lambda t: isinstance(t, JoblibTool))  # joblib last

        def check(out):
            if not (isinstance(out, np.ndarray) and out.shape == arr.shape and out[0] == arr[0]
                    and out[-1] == arr[-1] and out[len(out) // 2] == arr[len(arr) // 2]):
                raise AssertionError("wrong result")

        for tool in tools:
            self.guarded(row, tool, lambda tool=tool: check(tool.call(echo, arr)), "warm-up")
        for order in self.rotations(tools, s.array_reps):
            for tool in order:
                def once(tool=tool):
                    gc.collect()
                    t0 = perf()
                    out = tool.call(echo, arr)
                    took = perf() - t0
                    check(out)
                    del out
                    return 2 * nbytes / 1e6 / took

                r = self.guarded(row, tool, once)
                if r is not None:
                    row.add(tool.name, r)
        for name, values in row.samples.items():
            if name not in row.errors:
                row.figures[name] = statistics.median(values)
        row.extra["best"] = {k: max(v) for k, v in row.samples.items() if v}


# ---------------------------------------------------------------------------
# Bars


def ratio_bar(key: str, text: str, minimum: float) -> Bar:
    def check(row: Row) -> tuple[float | None, bool]:
        r = row.ratio("zpar")
        return r, r is not None and r >= minimum
    return Bar(key, f"zpar/Pool >= {minimum:g} ({text})", check)


def absolute_bar(key: str, text: str, maximum: float, fmt: Callable[[float], str], tool: str = "zpar") -> Bar:
    def check(row: Row) -> tuple[float | None, bool]:
        v = row.figures.get(tool)
        return v, v is not None and v <= maximum
    return Bar(key, f"{tool} <= {fmt(maximum)} ({text})", check)


def floor_bar(key: str, text: str, minimum: float, fmt: Callable[[float], str]) -> Bar:
    def check(row: Row) -> tuple[float | None, bool]:
        v = row.figures.get("zpar")
        return v, v is not None and v >= minimum
    return Bar(key, f"zpar >= {fmt(minimum)} ({text})", check)


#: Issue 12's bars.
BARS = [
    ratio_bar("cpu", "speed-up", 0.95),
    ratio_bar("submit", "vs Pool.apply_async", 3.0),
    ratio_bar("map_c100", "vs Pool.map, same chunksize", 0.9),
    ratio_bar("map_c1", "vs Pool.map, same chunksize", 0.9),
    absolute_bar("latency_p50", "absolute", 500.0, micro),
    absolute_bar("latency_tcp_p50", "absolute", 900.0, micro, tool="zpar-tcp"),
    absolute_bar("startup", "absolute", 0.2, secs),
    ratio_bar("numpy", "MB/s", 4.0),
    floor_bar("stream", "absolute", 250_000.0, rate),
]


# ---------------------------------------------------------------------------
# Report


def report(bench: Bench, tool_names: list[str], console: Any) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    bars = {b.row: b for b in BARS}
    order = ["cpu", "submit", "map_c100", "map_c1", "latency_p50", "latency_p99", "latency_tcp_p50",
             "latency_tcp_p99", "numpy", "stream", "startup",
             "startup_spawn"]
    rows = [bench.rows[k] for k in order if k in bench.rows]

    def cell(row: Row, tool: str) -> str:
        if tool in row.errors:
            return "ERROR"
        hung = f" HUNG x{row.hangs[tool]}" if row.hangs.get(tool) else ""
        v = row.figures.get(tool)
        if v is None:
            return "-" + hung
        r = row.ratio(tool)
        if tool == "Pool" or r is None:
            return row.fmt(v) + hung
        return f"{row.fmt(v)} ({r:.2f}x){hung}"

    table = Table(title=f"zpar core benchmarks: {bench.workers} workers; each figure with its ratio to "
                        f"multiprocessing.Pool in parentheses", show_lines=True) if Table else None
    headers = ["measure", "better", *tool_names, "zpar/Pool", "bar", "verdict"]
    if table is not None:
        for h in headers:
            table.add_column(h, overflow="fold", no_wrap=h in ("zpar/Pool", "verdict"))
    plain = []
    for row in rows:
        bar = bars.get(row.key)
        ratio = row.ratio("zpar")
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        bar_text, verdict = "", ""
        if bar is not None:
            value, ok = bar.check(row)
            hung = row.hangs.get("zpar", 0)
            bar_text = bar.text
            verdict = "PASS" if ok and not hung else ("FAIL (hung)" if hung else "FAIL")
            verdicts.append({"measure": row.key, "bar": bar.text, "value": value, "pass": ok and not hung,
                             "figure_meets_bar": ok, "zpar_hangs": hung, "zpar_error": row.errors.get("zpar")})
        better = "higher" if row.higher_is_better else "lower"
        cells = [f"{row.title}", better, *[cell(row, t) for t in tool_names], ratio_text, bar_text, verdict]
        plain.append(cells)
        if table is not None:
            style = f"[green]{verdict}" if verdict == "PASS" else (f"[bold red]{verdict}" if verdict else "")
            table.add_row(*cells[:-1], style)
    if table is not None:
        console.print(table)
    else:
        for cells in plain:
            print(" | ".join(cells))
    def out(text: str) -> None:
        if console is not None:
            console.print(text, markup=False, highlight=False)
        else:
            print(text)
    out("Notes:")
    for row in rows:
        if row.note:
            out(f"  {row.title}: {row.note}")
    closing = bench.rows["startup"].extra.get("close_s_median") if "startup" in bench.rows else None
    if closing:
        out("  close time after start-up (not in the figure): "
            + ", ".join(f"{k} {secs(v)}" for k, v in closing.items()))
    errors = [(row.title, tool, err) for row in rows for tool, err in row.errors.items()]
    errors += [(h["measure"], h["tool"], (f"HUNG: a {h['what']} had no answer in {h['timeout_s']:g} s "
                                          f"(pool torn down and reopened; its figure is from the other "
                                          f"repetitions)"))
               for h in bench.hangs]
    if errors:
        out("Errors:")
        seen = set()
        for title, tool, err in errors:
            if (title, tool, err) not in seen:
                seen.add((title, tool, err))
                out(f"  {title} / {tool}: {err}")
    passed = sum(v["pass"] for v in verdicts)
    out(f"Bars: {passed} of {len(verdicts)} passed"
        + ("" if passed == len(verdicts) else ": FAIL " + ", ".join(v["measure"] for v in verdicts if not v["pass"])))
    return verdicts


# ---------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run (well under a minute)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="worker processes for every tool (default: cores)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure and sample here")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one measurement may take before the tool counts as hung "
                             "(default 30, 10 with --quick)")
    parser.add_argument("--only", metavar="LIST", default="",
                        help="comma-separated subset: startup,cpu,submit,map,latency,numpy,stream")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    W = args.workers
    only = {x.strip() for x in args.only.split(",") if x.strip()}

    def want(name: str) -> bool:
        return not only or name in only

    console = Console(width=max(160, Console().width)) if Console else None
    started = perf()

    def make_tools(context=None) -> list[Tool]:
        tools: list[Tool] = [ZparTool(W), PoolTool(W, context), ExecutorTool(W, context)]
        if importlib.util.find_spec("loky") is not None:
            tools.append(LokyTool(W))
        if importlib.util.find_spec("joblib") is not None:
            tools.append(JoblibTool(W))
        return tools

    tools = make_tools()
    names = [t.name for t in tools]
    timeout = args.timeout if args.timeout is not None else (10.0 if args.quick else 30.0)
    bench = Bench(sizes, W, console, timeout)
    git = git_state()
    bench.log(f"zpar benchmarks: {W} workers, {'quick' if args.quick else 'full'} run; tools: {', '.join(names)}; "
              f"python {platform.python_version()}, start method {mp.get_start_method()}; zpar at "
              f"{(git['commit'] or '?')[:10]}{' (modified)' if git['dirty'] else ''}")

    # Start-up goes first, while this process holds no pool and no zpar client:
    # the fork-based peers then fork a process without extra threads.
    if want("startup"):
        bench.log("start-up ...")
        spawn = mp.get_context("spawn")
        spawn_tools: list[Tool] = [PoolTool(W, spawn), ExecutorTool(W, spawn)]
        bench.bench_startup(tools, spawn_tools)

    # Long-lived pools for the rest. The fork-based peers are created and warmed
    # (their workers forked) before the zpar client starts its I/O thread.
    opened: list[Tool] = []
    try:
        for tool in [t for t in tools if t.name != "zpar"] + [t for t in tools if t.name == "zpar"]:
            tool.open()
            opened.append(tool)
            tool.first(tool.h)
        if want("cpu"):
            bench.log("CPU-bound speed-up ...")
            bench.bench_cpu(tools)
        if want("submit"):
            bench.log("submit one at a time ...")
            bench.bench_submit(tools)
        if want("map"):
            bench.log("map ...")
            bench.bench_map(tools)
        if want("latency"):
            bench.log("round-trip latency ...")
            bench.bench_latency(tools)
            bench.log("round-trip latency, a broker and an agent on loopback TCP ...")
            tcp = ZparTcpTool(W)
            tcp.open()
            opened.append(tcp)
            names.insert(1, tcp.name)
            bench.bench_latency([t for t in tools if t.name == "Pool"] + [tcp], key="latency_tcp",
                                title="round trip, TCP broker + agent")
        if want("numpy"):
            bench.log("NumPy array ...")
            bench.bench_numpy(tools)
        if want("stream"):
            bench.log("stream of tiny items ...")
            try:
                if "zpar-tcp" not in names:  # opened for the latency rows already
                    tcp = ZparTcpTool(W)
                    tcp.open()
                    opened.append(tcp)
                    tcp.first(tcp.h)
                    names.insert(1, tcp.name)
            except Exception as exc:  # noqa: BLE001 - the embedded figure stands alone
                bench.log(f"zpar over TCP did not start, left out: {exc}", "red")
            bench.bench_stream([t for t in opened if t.name in ("zpar", "zpar-tcp", "Pool")])
    finally:
        for tool in reversed(opened):
            try:
                tool.close()
            except Exception as exc:  # noqa: BLE001
                bench.log(f"closing {tool.name} failed: {exc}")

    verdicts = report(bench, names, console)
    elapsed = perf() - started
    (console.print if console else print)(f"Total time {elapsed:.0f} s")
    if args.json:
        doc = {
            "meta": {"zpar_git": git, "workers": W, "quick": args.quick, "python": sys.version,
                     "platform": platform.platform(),
                     "start_method": mp.get_start_method(), "cpu_count": os.cpu_count(), "tools": names,
                     "elapsed_s": elapsed, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "results": {k: r.to_json() for k, r in bench.rows.items()},
            "bars": verdicts,
            "hangs": bench.hangs,
        }
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
