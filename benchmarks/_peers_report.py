"""bench_peers.py's report: the markdown table, README.md's copy of it, and the chart of ratios to Pool."""

from __future__ import annotations

import os
import re
from typing import Any

from bench_core import Row

# The lines every system runs, in the table's order (a prefix matches the map lines' chunksizes).
COMPARED = ["startup", "cpu", "submit", "map_c", "imap_c", "latency_p50", "latency_p99", "numpy"]
# zpar's own lines, with a peer for scale where there is one.
ZPAR_ONLY = ["startup_process", "hub_cpu", "stream", "curve"]
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- bench_peers table: begin -->", "<!-- bench_peers table: end -->"


def ordered(rows: dict[str, Row], prefixes: list[str]) -> list[Row]:
    out: list[Row] = []
    for prefix in prefixes:
        keys = [k for k in rows if k == prefix or (prefix.endswith("_c") and k.startswith(prefix))]
        # map lines: the big chunksize first
        keys.sort(key=lambda k: -int(k.rsplit("_c", 1)[1]) if prefix.endswith("_c") else 0)
        out += [rows[k] for k in keys]
    return out


def spread(row: Row, name: str) -> float | None:
    """Half the range of the repetitions, as a share of the median (None with fewer than 2)."""
    values = row.samples.get(name) or []
    median = row.figures.get(name)
    if len(values) < 2 or not median:
        return None
    return (max(values) - min(values)) / 2 / abs(median)


def cell(row: Row, name: str) -> str:
    if name in row.errors:
        return "error"
    hung = f" (hung x{row.hangs[name]})" if row.hangs.get(name) else ""
    value = row.figures.get(name)
    if value is None:
        return "-" + hung
    text = row.fmt(value)
    s = spread(row, name)
    if s is not None:
        text += f" ±{s * 100:.0f}%"
    r = row.ratio(name)
    if name != "Pool" and r is not None:
        text += f" ({r:.2f}x)"
    return text + hung


def table(rows: dict[str, Row], names: list[str], keys: list[str]) -> str:
    lines = [f"| workload | better | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for row in ordered(rows, keys):
        lines.append(f"| {row.title} | {'higher' if row.higher_is_better else 'lower'} | "
                     + " | ".join(cell(row, n) for n in names) + " |")
    return "\n".join(lines)


def heading(meta: dict[str, Any]) -> str:
    git = meta["zpar_git"]
    commit = f"`{(git.get('commit') or '?')[:7]}`" + (" (modified)" if git.get("dirty") else "")
    return (f"{meta['time']}, {meta['cpu_count']} cores, Python {meta['python']}, zpar {commit}; "
            f"{meta['workers']} workers for every system; {meta['elapsed_s']:.0f} s"
            f"{' (--quick)' if meta['quick'] else ''}.")


def main_table(rows: dict[str, Row], names: list[str], meta: dict[str, Any]) -> str:
    """The comparison: what README.md shows."""
    return (f"{heading(meta)} Each cell: the median, ± half the range of the repetitions, and (in parentheses) "
            f"the figure / Pool's in the same run.\n\n" + table(rows, names, COMPARED) + "\n")


def markdown(rows: dict[str, Row], names: list[str], meta: dict[str, Any]) -> str:
    """docs/performance.md: the comparison, zpar's own lines, what each line does, what was skipped."""
    parts = ["# zpar and its peers\n", "Written by `python benchmarks/bench_peers.py` (see benchmarks/README.md).\n",
             main_table(rows, names, meta)]
    own = [n for n in ("zpar", "Pool") if any(n in r.figures for r in ordered(rows, ZPAR_ONLY))]
    if own:
        parts.append("zpar's own lines (Pool, where present, for scale):\n\n" + table(rows, own, ZPAR_ONLY) + "\n")
    notes = [f"- {r.title}: {r.note}" for r in ordered(rows, COMPARED + ZPAR_ONLY) if r.note]
    notes += [f"- {n}" for n in meta.get("skipped", [])]
    notes.append("- pp, Dask and Ray have no chunksize: a chunk is one task of `map_chunk` over its items.")
    parts.append("Notes:\n\n" + "\n".join(notes) + "\n")
    parts.append("![zpar and its peers: speed relative to multiprocessing.Pool](performance.png)\n")
    return "\n".join(parts)


def update_readme(rows: dict[str, Row], names: list[str], meta: dict[str, Any]) -> str:
    """Puts the comparison between README.md's markers; says what it did."""
    try:
        with open(README) as fh:
            text = fh.read()
    except OSError as exc:
        return f"README.md not updated: {exc}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return f"README.md not updated: its markers ({BEGIN}) are missing"
    new = pattern.sub(lambda _: f"{BEGIN}\n{main_table(rows, names, meta)}{END}", text)
    with open(README, "w") as fh:
        fh.write(new)
    return "README.md's Performance table updated"


def relative(row: Row, value: float, pool: float) -> float:
    """Speed relative to Pool: above 1 is better, whichever way the line counts."""
    return value / pool if row.higher_is_better else pool / value


def write_png(path: str, rows: dict[str, Row], names: list[str], meta: dict[str, Any]) -> str:
    """The chart of every system's speed relative to Pool (log scale), with the range of its repetitions."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no chart (pip install -e '.[bench]' installs it)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [r for r in ordered(rows, COMPARED) if r.figures.get("Pool")]
    if not lines or "Pool" not in names:
        return "no chart: it needs Pool's figures"
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.12 * len(lines) * max(2, len(names))))
    step = 0.8 / len(names)
    for j, name in enumerate(names):
        ys, xs, lo, hi = [], [], [], []
        for i, row in enumerate(lines):
            pool, value = row.figures["Pool"], row.figures.get(name)
            if value is None or pool is None or value <= 0:
                continue
            x = relative(row, value, pool)
            rel = [relative(row, v, pool) for v in row.samples.get(name, []) if v > 0] or [x]
            ys.append(i - 0.4 + step * (j + 0.5))
            xs.append(x)
            lo.append(max(0.0, x - min(rel)))
            hi.append(max(0.0, max(rel) - x))
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=2, label=name, markersize=5)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(lines)), [r.title for r in lines])
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to multiprocessing.Pool in the same run (log scale; > 1 is faster)")
    ax.set_title(f"zpar and its peers, {meta['workers']} workers each, {meta['time']}\n"
                 f"dot: median; whiskers: range of the repetitions", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"
