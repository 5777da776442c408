#!/usr/bin/env python
"""zpar against its peers, in one run: multiprocessing.Pool, ProcessPoolExecutor, loky, pp, Dask, Ray.

    pip install -e '.[bench]' && python benchmarks/bench_peers.py      # <= 10 minutes on 2 cores
    python benchmarks/bench_peers.py --quick --systems pool,zpar --only submit --json out.json

Every system gets the same number of workers (2). Each figure is the median
of 3 repetitions (5 for the CPU-bound speed-up), the order of the systems
rotated each repetition, printed with its ratio to multiprocessing.Pool in
the same run and its spread. A full run writes the table to
docs/performance.md (and into README.md's Performance section) and a chart
of the ratios to docs/performance.png. A system that is not installed is
skipped with a note; every process the run starts is killed at its end.
What each line times: benchmarks/README.md, "Peers: bench_peers.py".
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# benchmarks/ is on sys.path
from _cluster import private_config_home
from _common import git_state, rotated, write_json
from _peers import SYSTEMS, ChildWatch, ZparCliTool, ZparPeer, missing
from _peers_report import markdown, update_readme, write_png
from _peers_tasks import nbytes
from _tasks import calibrate, sum_primes
from bench_core import Bench, Row, Sizes, Tool, mbps, secs

perf = time.perf_counter
HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")
WORKLOADS = ["startup", "cpu", "hub", "submit", "map", "imap", "latency", "numpy", "stream", "curve"]


@dataclass(frozen=True)
class PeerSizes(Sizes):
    latency_runs: int = 3  # bench_core's latency line, run this many times: its median and spread
    hub_windows: int = 4
    hub_window: float = 2.5  # seconds: psutil's CPU times tick every 10 ms
    curve_mb: int = 64


# map_n: {N/8: N, 1: n}. Sized for the slowest peers (Dask ~150-400 tiny tasks/s here, Ray ~600) to fit 10 minutes.
FULL = PeerSizes(reps=3, submit_n=2000, map_n={6250: 50_000, 1: 2000}, latency_n=300, latency_block=100,
                 cpu_ms=60, cpu_calls_per_worker=8, cpu_reps=5, array_mb=50, array_reps=3, startup_reps=3)
QUICK = PeerSizes(reps=3, submit_n=400, map_n={2500: 20_000, 1: 400}, latency_n=100, latency_block=50,
                  cpu_ms=40, cpu_calls_per_worker=4, cpu_reps=5, array_mb=20, array_reps=3, startup_reps=1,
                  latency_runs=1, stream_n=100_000, curve_mb=16, hub_windows=3, hub_window=1.0)


def pct(x: float) -> str:
    return f"{x:.2f} %"


def sorted_unordered(tool: Any, fn: Callable[[Any], Any], items: list[Any], chunksize: int) -> list[Any]:
    return sorted(tool.imap_unordered(fn, items, chunksize))


class PeerBench(Bench):
    """bench_core's measures, with medians instead of bests, and the lines only this comparison has."""

    sizes: PeerSizes

    def finish(self, row: Row) -> None:  # type: ignore[override]
        for tool, values in row.samples.items():
            if tool not in row.errors and values:
                row.figures[tool] = statistics.median(values)
        row.note = row.note.replace("best of", "median of")  # bench_core's words, for its best-of figures

    def bench_cpu(self, tools: list[Tool]) -> None:
        super().bench_cpu(tools)
        row = self.rows["cpu"]
        self.finish(row)
        row.note = (f"{row.extra['calls']} calls of sum_primes({row.extra['n']:,}) through map(chunksize=1); "
                    f"speed-up = best serial time / each parallel time; median of {self.sizes.cpu_reps}, "
                    f"ideal {self.workers}x")

    def bench_latency(self, tools: list[Tool], key: str = "latency", title: str = "round trip") -> None:
        """bench_core's latency line ``latency_runs`` times: each run's p50 and p99 are one repetition."""
        rows: dict[str, Row] = {}
        keys = (f"{key}_p50", f"{key}_p99")
        for _ in range(self.sizes.latency_runs):
            super().bench_latency(tools, key=key, title=title)
            for k in keys:
                run = self.rows[k]
                row = rows.setdefault(k, run)
                for name, value in run.figures.items():
                    if value is not None:
                        row.add(name, value)
                row.errors.update(run.errors)
                for name, n in run.hangs.items():
                    row.hangs[name] = row.hangs.get(name, 0) + (n if row is not run else 0)
        for k, row in rows.items():
            self.rows[k] = row
            self.finish(row)
        rows[keys[0]].note += f"; median of {self.sizes.latency_runs} such runs"

    def bench_imap(self, tools: list[Tool]) -> None:
        """bench_core's map line through ``imap_unordered`` (results sorted, in the time, to be checked)."""
        have = [t for t in tools if hasattr(t, "imap_unordered")]
        saved = {k: self.rows.pop(k) for k in list(self.rows) if k.startswith("map_c")}
        for tool in have:  # an instance attribute: bench_map calls tool.map
            tool.map = functools.partial(sorted_unordered, tool)  # type: ignore[method-assign]
        try:
            self.bench_map(have)
        finally:
            for tool in have:
                del tool.map
            for key in [k for k in self.rows if k.startswith("map_c")]:
                row = self.rows.pop(key)
                row.key, row.title = "i" + key, row.title.replace("map,", "imap_unordered,")
                row.note += "; only the systems that have imap_unordered"
                self.rows[row.key] = row
            self.rows.update(saved)

    def bench_process_startup(self) -> None:
        """``python -c`` a fresh interpreter: import, a pool of W, one result, close. zpar's, and Pool's for scale."""
        w = self.workers
        scripts = {
            "zpar": f"import zpar\nwith zpar.Client(workers={w}) as c:\n    assert c.submit(abs, -1).result() == 1",
            "Pool": f"import multiprocessing as mp\nwith mp.Pool({w}) as p:\n    assert p.apply(abs, (-1,)) == 1",
        }
        row = self.row("startup_process", title="`python -c 'import zpar; ...'`, whole", unit="s",
                       higher_is_better=False, fmt=secs,
                       note=f"a fresh interpreter: import, a pool of {w}, one result, close; "
                            f"median of {self.sizes.startup_reps}")
        for order in (rotated(list(scripts), rep) for rep in range(self.sizes.startup_reps)):
            for name in order:
                t0 = perf()
                done = subprocess.run([sys.executable, "-c", scripts[name]], capture_output=True, text=True,
                                      timeout=self.timeout, check=False)
                took = perf() - t0
                if done.returncode:
                    row.errors.setdefault(name, (done.stderr.strip().splitlines() or ["?"])[-1][:160])
                else:
                    row.add(name, took)
        self.finish(row)

    def bench_hub(self, zpar_tool: ZparPeer) -> None:
        """Item 8: the embedded hub's own CPU (broker + agent; not its workers) while the workers compute.

        psutil reads a process's CPU time in clock ticks (10 ms), so each
        window runs the CPU-bound job again and again for ``hub_window`` s:
        a tick is then 0.4 % of a 2.5 s window, 0.1 % of the whole run.
        """
        s = self.sizes
        n = self.rows["cpu"].extra["n"] if "cpu" in self.rows else calibrate(s.cpu_ms / 1e3)[0]
        items = [n] * (s.cpu_calls_per_worker * self.workers)
        row = self.row("hub_cpu", title="embedded hub's CPU while its workers compute", unit="% of a core",
                       higher_is_better=False, fmt=pct,
                       note=f"the hub process's own user+system CPU (psutil; its worker children not counted) / "
                            f"wall time, over {s.hub_windows} windows of >= {s.hub_window:g} s of "
                            f"map(sum_primes, chunksize=1) on {len(items)} calls; the figure is over all of them; "
                            f"bar < 1 %")
        totals = [0.0, 0.0, 0.0]  # hub CPU, workers' CPU, wall

        def window() -> float:
            hub = zpar_tool.hub()
            kids = hub.children()
            c0, k0, t0 = hub.cpu_times(), [k.cpu_times() for k in kids], perf()
            while perf() - t0 < s.hub_window:
                zpar_tool.map(sum_primes, items, 1)  # type: ignore[no-untyped-call]
            c1, k1, t1 = hub.cpu_times(), [k.cpu_times() for k in kids], perf()
            own = (c1.user + c1.system) - (c0.user + c0.system)
            work = sum((b.user + b.system) - (a.user + a.system) for a, b in zip(k0, k1, strict=True))
            for i, x in enumerate((own, work, t1 - t0)):
                totals[i] += x
            return 100 * own / (t1 - t0)

        self.guarded(row, zpar_tool, lambda: zpar_tool.map(sum_primes, items, 1), "warm-up")  # type: ignore[no-untyped-call]
        for _ in range(s.hub_windows):
            r = self.guarded(row, zpar_tool, window)
            if r is not None:
                row.add("zpar", r)
        if totals[2] and "zpar" not in row.errors:
            row.figures["zpar"] = 100 * totals[0] / totals[2]
            row.extra = {"hub_cpu_s": totals[0], "workers_cpu_s": totals[1], "wall_s": totals[2],
                         "workers_pct_of_a_core": 100 * totals[1] / totals[2]}

    def bench_curve(self, workdir: str) -> None:
        """A 64 MB argument through a real zpar-broker and zpar-agent over loopback TCP with CurveZMQ."""
        mb = self.sizes.curve_mb
        arr = np.ones(mb * 1_000_000 // 8)
        private_config_home()  # the user's own secret, made for this run: not the caller's
        tool = ZparCliTool(self.workers, os.path.join(workdir, "daemons.log"))
        row = self.row("curve", title=f"{mb} MB argument over CurveZMQ, zpar-broker + zpar-agent (TCP)",
                       unit="MB/s", higher_is_better=True, fmt=mbps,
                       note=f"the CLIs on loopback TCP, default authentication (CurveZMQ + ZAP); a task that "
                            f"returns its argument's size: {mb} MB counted per call; median of {self.sizes.reps}")

        def once() -> float:
            gc.collect()
            t0 = perf()
            got = tool.call(nbytes, arr)
            took = perf() - t0
            if got != arr.nbytes:
                raise AssertionError(f"the task saw {got} bytes of {arr.nbytes}")
            return arr.nbytes / 1e6 / took

        try:
            self.guarded(row, tool, tool.open, "start")
            if tool.h is None:
                return
            for _ in range(self.workers):  # each worker's first large argument maps fresh memory: not timed
                self.guarded(row, tool, once, "warm-up")
            for _ in range(self.sizes.reps):
                r = self.guarded(row, tool, once)
                if r is not None:
                    row.add("zpar", r)
        finally:
            tool.close()
        self.finish(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run, a 1-2 minute smoke")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for every system (default 2)")
    parser.add_argument("--only", metavar="LIST", default="", help="workloads: " + ",".join(WORKLOADS))
    parser.add_argument("--systems", metavar="LIST", default="",
                        help="systems: " + ",".join(s.key for s in SYSTEMS) + " (default: all installed)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure and sample here")
    parser.add_argument("--md", metavar="PATH", help="the markdown table (default on a full run of everything: "
                                                      "docs/performance.md, and README.md's section)")
    parser.add_argument("--png", metavar="PATH", help="the chart (default as --md: docs/performance.png)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one measurement may take before it counts as hung (default 90, 30 with --quick)")
    args = parser.parse_args(argv)
    only = [w for w in WORKLOADS if not args.only or w in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(WORKLOADS)
    keys = [s.key for s in SYSTEMS]
    chosen = [k for k in keys if not args.systems or k in args.systems.split(",")]
    unknown |= set(filter(None, args.systems.split(","))) - set(keys)
    if unknown:
        parser.error(f"unknown workload or system: {', '.join(sorted(unknown))}")
    everything = not (args.quick or args.only or args.systems)
    md_path = args.md or (os.path.join(DOCS, "performance.md") if everything else None)
    png_path = args.png or (os.path.join(DOCS, "performance.png") if everything else None)

    notes: list[str] = []
    tools: list[Tool] = []
    for system in SYSTEMS:
        if system.key in chosen:
            why = missing(system)
            if why:
                notes.append(f"{system.key} skipped: {why}")
            else:
                tools.append(system.make(args.workers))
    for note in notes:
        print(note, file=sys.stderr)
    names = [t.name for t in tools]
    zpar_tool = next((t for t in tools if isinstance(t, ZparPeer)), None)
    sizes = QUICK if args.quick else FULL
    bench = PeerBench(sizes, args.workers, None, args.timeout or (30.0 if args.quick else 90.0))
    git = git_state()
    bench.log(f"bench_peers: {args.workers} workers, {'quick' if args.quick else 'full'} run; systems: "
              f"{', '.join(names)}; workloads: {', '.join(only)}; python {platform.python_version()}; zpar at "
              f"{(git['commit'] or '?')[:10]}{' (modified)' if git['dirty'] else ''}")
    started = perf()
    workdir = tempfile.mkdtemp(prefix="zpar-bench-peers-")
    watch = ChildWatch()
    watch.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below kills what we started
    opened: list[Tool] = []
    try:
        # Start-up first, while this process holds no pool: the fork-based peers fork a process without threads.
        if "startup" in only:
            bench.log(f"[{perf() - started:.0f} s] start-up ...")
            bench.bench_startup(tools, [])
            bench.rows.pop("startup_spawn", None)
            if zpar_tool is not None:
                bench.bench_process_startup()
        long_lived = [w for w in only if w not in ("startup", "curve")]
        if long_lived:
            # The forking peers first, Dask's and Ray's threads last.
            for tool in sorted(tools, key=lambda t: t.name in ("Dask", "Ray")):
                bench.log(f"opening {tool.name} ...")
                tool.open()
                opened.append(tool)
                tool.first(tool.h)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("cpu", lambda: bench.bench_cpu(tools)),
            ("hub", lambda: bench.bench_hub(zpar_tool) if zpar_tool else None),
            ("submit", lambda: bench.bench_submit(tools)),
            ("map", lambda: bench.bench_map(tools)),
            ("imap", lambda: bench.bench_imap(tools)),
            ("latency", lambda: bench.bench_latency(tools)),
            ("numpy", lambda: bench.bench_numpy(tools)),
            ("stream", lambda: bench.bench_stream([t for t in tools if t.name in ("Pool", "zpar")])),
            ("curve", lambda: bench.bench_curve(workdir) if zpar_tool else None),
        ]
        for name, step in steps:
            if name in only:
                bench.log(f"[{perf() - started:.0f} s] {name} ...")
                step()
    finally:
        for tool in reversed(opened):
            try:
                tool.close()
            except Exception as exc:  # noqa: BLE001 - the rest must still be closed
                bench.log(f"closing {tool.name} failed: {exc}")
        left = watch.kill_all()
        if left:
            print(f"stopped {len(left)} processes still running at the end: {sorted(set(left.values()))}",
                  file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)  # the daemons' log

    elapsed = perf() - started
    meta = {"zpar_git": git, "workers": args.workers, "quick": args.quick, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "systems": names, "skipped": notes,
            "workloads": only, "elapsed_s": round(elapsed, 1),
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = markdown(bench.rows, names, meta)
    print(text)
    print(f"Total time {elapsed:.0f} s")
    if md_path:
        with open(md_path, "w") as fh:
            fh.write(text)
        print(f"table written to {md_path}")
        if not args.md:
            print(update_readme(bench.rows, names, meta))
    if png_path:
        print(write_png(png_path, bench.rows, names, meta))
    if args.json:
        write_json(args.json, {
            "meta": meta,
            "results": {k: r.to_json() for k, r in bench.rows.items()},
            "hangs": bench.hangs,
        })
    errors = any(r.errors or r.hangs for r in bench.rows.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
