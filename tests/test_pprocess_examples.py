"""pprocess 0.5.1's own example programs print through zpar.pprocess what they print through pprocess.

The programs (simple_*, tests/, PyGmy, concurrency-sig) are not stored here:
the ``release`` fixture downloads pprocess 0.5.1 from PyPI once and ports it
to Python 3 (pprocess_examples/port.py), cached under pytest's temporary
root; without network (or lib2to3, gone in Python 3.13) the tests are skipped. Each program runs with
``import zpar.pprocess as pprocess``, at the reduced sizes the harness sets
(pprocess_examples/harness.py says which), and what it prints, normalised
where runs differ by nature, must equal what the original pprocess printed
(``expected/``, written by ``pprocess_examples/regenerate.py``).

The persistent and background programs run twice: in one process, and as
``--start`` then ``--reconnect`` (a second process collects what the first
one's background call computed). Nothing a program starts may outlive it
(the harness runs it under a reaper, and fails past a grace period).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pprocess_examples import harness, port


@pytest.fixture(scope="session")
def release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ported release: downloaded and ported once, kept for later runs beside pytest's numbered temporary
    directories (in the given --basetemp, which pytest empties, when there is one)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base if request.config.option.basetemp else base.parent) / "pprocess-examples-cache"
    try:
        return port.ported(cache)
    except port.Unavailable as exc:
        pytest.skip(f"pprocess {port.VERSION}'s examples are fetched from PyPI and ported at test time; here: {exc}")


@pytest.mark.parametrize("example", harness.EXAMPLES, ids=harness.example_id)
def test_example_prints_what_it_prints_with_the_original_pprocess(example, release, tmp_path):
    expected = harness.load_expected(example)
    ran = harness.run(example, "zpar", tmp_path, release, timeout=45)
    assert ran.returncode == expected["returncode"], f"exit {ran.returncode}; stderr:\n{ran.stderr[-4000:]}"
    assert ran.output == expected["output"], f"stderr:\n{ran.stderr[-4000:]}"


def test_every_program_of_the_release_runs_and_has_an_expected_output(request):
    assert {harness.expected_path(e).name for e in harness.EXAMPLES} == {
        p.name for p in harness.EXPECTED.glob("*.json")}
    release = request.getfixturevalue("release")
    programs = {p.relative_to(release).as_posix() for folder in port.FOLDERS for p in (release / folder).rglob("*.py")}
    assert programs - set(harness.HELPERS) == {e.path for e in harness.EXAMPLES}
