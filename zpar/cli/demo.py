"""``zpar demo``: Parallel Python's classic, the sum of primes below N, serial and parallel."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d != 0 for d in range(3, math.isqrt(n) + 1, 2))


def sum_primes(n: int) -> int:
    """The sum of the primes below ``n``, by trial division (CPU-bound on purpose)."""
    return sum(x for x in range(2, n) if is_prime(x))


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def run_demo(workers: int | None = None, jobs: int = 32, size: int = 100_000) -> int:
    from ..client import Client

    console = Console()
    inputs = [size + 1000 * i for i in range(jobs)]
    console.print(f"[bold]zpar demo[/]: sum of primes below N for {jobs} values of N from {inputs[0]:,} "
                  f"to {inputs[-1]:,}")

    with _progress(console) as bar:
        task = bar.add_task("serial", total=jobs)
        start = time.perf_counter()
        serial = []
        for n in inputs:
            serial.append(sum_primes(n))
            bar.advance(task)
        t_serial = time.perf_counter() - start

    start = time.perf_counter()
    with Client(workers=workers) as client:
        t_start = time.perf_counter() - start
        nworkers = client.wait_for_workers(workers or 1)
        with _progress(console) as bar:
            task = bar.add_task("zpar", total=jobs)
            start = time.perf_counter()
            parallel = []
            for value in client.map(sum_primes, inputs):
                parallel.append(value)
                bar.advance(task)
            t_par = time.perf_counter() - start

    if parallel != serial:
        console.print("[red]the parallel results differ from the serial ones[/]")
        return 1
    console.print(f"workers:   {nworkers} (embedded cluster started in {t_start:.2f} s)")
    console.print(f"serial:    {t_serial:.2f} s")
    console.print(f"zpar:      {t_par:.2f} s")
    console.print(f"speed-up:  [bold green]{t_serial / t_par:.2f}x[/] with {nworkers} workers; "
                  f"all {jobs} results match")
    return 0
