"""Progress bars: ``zpar.progress(futures)`` and ``map(..., progress=True)``, drawn on a console we read."""

from __future__ import annotations

import concurrent.futures as cf
import io
import re

import pytest
import tasks
from rich.console import Console

import zpar

pytestmark = pytest.mark.timeout(60)


def console() -> tuple[Console, io.StringIO]:
    """A console that is not a terminal: the bar is drawn once, in its last state, when it stops."""
    out = io.StringIO()
    return Console(file=out, force_terminal=False, force_jupyter=False, width=120), out


def test_progress_waits_for_every_future_and_shows_them_all_done(client):
    con, out = console()
    futures = [client.submit(tasks.square, i) for i in range(30)]
    futures.append(client.submit(tasks.raise_value_error, "counted as finished"))
    returned = zpar.progress(futures, description="squares", console=con)
    assert returned == futures and all(f.done() for f in futures)
    assert [f.result() for f in futures[:30]] == [i * i for i in range(30)]
    assert re.search(r"squares .*31/31 .*100%", out.getvalue()), out.getvalue()


def test_progress_takes_any_concurrent_future_and_an_empty_list():
    con, out = console()
    with cf.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(pow, 2, i) for i in range(5)]
        assert [f.result() for f in zpar.progress(futures, console=con)] == [2 ** i for i in range(5)]
    assert "5/5" in out.getvalue()
    assert zpar.progress([], console=console()[0]) == []


@pytest.mark.parametrize("chunksize", [None, 7])
def test_map_with_progress_yields_the_same_results_and_counts_them(client, chunksize, monkeypatch):
    con, out = console()
    monkeypatch.setattr("zpar._progress._default_console", lambda: con)
    assert list(client.map(tasks.square, range(50), chunksize=chunksize, progress=True)) == [i * i for i in range(50)]
    assert re.search(r"square .*50/50 .*100%", out.getvalue()), out.getvalue()
    con, out = console()
    monkeypatch.setattr("zpar._progress._default_console", lambda: con)
    got = sorted(client.imap_unordered(tasks.square, (i for i in range(20)), progress="unordered squares"))
    assert got == sorted(i * i for i in range(20))
    assert re.search(r"unordered squares .*20(/\?)?", out.getvalue()), out.getvalue()  # no length: a count


def test_leaving_a_map_with_progress_early_cancels_what_is_pending(client, monkeypatch):
    monkeypatch.setattr("zpar._progress._default_console", lambda: console()[0])
    results = client.map(tasks.square, range(1000), progress=True)
    assert next(results) == 0
    results.close()  # a generator's close: the map's pending tasks are let go (cancelled)
    assert client.submit(tasks.square, 3).result(timeout=30) == 9  # the cluster is free again
