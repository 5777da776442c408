"""benchmarks/bench_peers.py (zpar against its peers) runs, writes its table and JSON, and leaves nothing running."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytest.importorskip("numpy")  # bench_core's, and so bench_peers' (the test extra has it)

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_peers.py"


def survivors_of(pid: int) -> list[str]:
    """Embedded zpar hubs that process ``pid`` started and that still run (each names its parent's pid)."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"--parent-pid {pid}" in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(f"pid {proc.pid}: {cmdline[:160]}")
    return out


@pytest.mark.timeout(90)
def test_quick_run_of_one_workload_writes_the_table_and_json_and_stops_what_it_started(tmp_path: Path) -> None:
    md, js, png = tmp_path / "peers.md", tmp_path / "peers.json", tmp_path / "peers.png"
    proc = subprocess.Popen([sys.executable, str(BENCH), "--quick", "--only", "submit", "--systems", "pool,zpar",
                             "--md", str(md), "--json", str(js), "--png", str(png)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"bench_peers.py --quick --only submit took over 60 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]

    figures = json.loads(js.read_text())["results"]["submit"]["figures"]
    assert set(figures) == {"Pool", "zpar"}
    assert all(v > 0 for v in figures.values())
    table = md.read_text()
    assert "| workload | better | Pool | zpar |" in table
    assert "| submit one at a time, tiny tasks | higher |" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in output
    assert survivors_of(proc.pid) == []
