"""A task's traceback shows its source lines, also for functions shipped by value (``__main__``, closures)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import traceback

import pytest

from zpar import serialize

SCRIPT = textwrap.dedent('''
    import sys
    import zpar

    def scale(x):
        factor = x * 2
        raise ValueError(f"cannot scale {factor}")

    if __name__ == "__main__":
        with zpar.Client(workers=1) as client:
            try:
                client.submit(scale, 21).result(timeout=30)
            except ValueError as exc:
                print(exc.__cause__)
''')


def test_a_main_function_s_remote_traceback_names_its_file_and_shows_its_lines(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 7, in scale' in out.stdout
    assert 'raise ValueError(f"cannot scale {factor}")' in out.stdout
    assert "<dynamic-code>" not in out.stdout


def _closure_from_a_file_that_is_gone(tmp_path) -> bytes:
    """A closure pickled by another process from a file deleted since (a node without the file)."""
    source = tmp_path / "gone.py"
    source.write_text(textwrap.dedent('''
        def make(offset):
            def shifted(y):
                total = y + offset
                return 1 / (total - total)
            return shifted
    '''))
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import gone, sys; "
            "from zpar import serialize; sys.stdout.buffer.write(serialize.dump_function(gone.make(3))[1])")
    blob = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True).stdout
    os.remove(source)
    return blob


def test_lines_travel_with_the_code_to_a_worker_that_has_no_such_file(tmp_path):
    blob = _closure_from_a_file_that_is_gone(tmp_path)
    fn = pickle.loads(blob)
    with pytest.raises(ZeroDivisionError) as info:
        fn(1)
    text = "".join(traceback.format_exception(info.value))
    assert f'File "{tmp_path / "gone.py"}", line 5, in shifted' in text
    assert "return 1 / (total - total)" in text


def test_a_function_s_digest_is_the_same_each_time_it_is_pickled():
    def square(x):
        return x * x

    assert serialize.dump_function(square) == serialize.dump_function(square)
    assert len(serialize.dump_function(os.path.join)[1]) < 100  # by reference: no code, no source


class _ExitsWhenUnpickled(Exception):
    """An exception whose unpickling raises SystemExit (as a hostile or broken __reduce__ might)."""

    def __reduce__(self):
        return (sys.exit, (3,))


def _raise_exits_when_unpickled(_):
    raise _ExitsWhenUnpickled("odd")


def test_an_exception_that_exits_when_unpickled_travels_as_a_stand_in_and_the_worker_lives(client):
    import zpar

    with pytest.raises(zpar.TaskError, match="_ExitsWhenUnpickled: odd"):
        client.submit(_raise_exits_when_unpickled, 1).result(timeout=30)
    assert client.submit(divmod, 7, 2).result(timeout=30) == (3, 1)
