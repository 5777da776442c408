"""Fetch pprocess 0.5.1's source release from PyPI and port its programs (and pprocess itself) to Python 3.

Nothing of pprocess is stored in this repository: the tests call ``ported``,
which downloads the release with pip, extracts ``examples/`` and ``tests/``
(and ``pprocess.py``, which only ``regenerate.py`` runs) and ports them:

- the standard library's ``lib2to3``, with its default fixers (``print``,
  ``xrange``, ``map``, ``has_key``, ``.next()``, ``raw_input``...);
- then these rules of ours, each a pattern for a construct that ``lib2to3``
  leaves as Python 2 had it (``PROGRAM_RULES``, ``MODULE_RULES``):
  the ``file()`` builtin; PIL's modules imported at the top level
  (``import Image``) instead of from the ``PIL`` package; ``__div__`` (now
  ``__truediv__``); ``is`` and ``is not`` against a string literal (now an
  equality test: CPython 3 no longer interns the literals the same way);
  in pprocess.py, its channels' files opened in text mode (Python 3 needs
  binary mode for pickles: unbuffered for reading, as pprocess has them, so
  that ``poll`` sees every byte; buffered for writing, so that a pickle goes
  out in one write when pprocess flushes it).

``python tests/pprocess_examples/port.py DIR`` writes the result into DIR.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

VERSION = "0.5.1"
#: The release on PyPI; the expected outputs were written from this one.
SHA256 = "9b70f097587ac403523cd0e055a504b308f49f84aaa831dc842fe8cc5f51b68c"
#: A local copy of the release to use instead of downloading it.
SDIST_ENV = "ZPAR_PPROCESS_SDIST"
#: The folders of the release that hold the programs.
FOLDERS = ("examples", "tests")
#: Modules that old PIL installed at the top level and Pillow has in the PIL package.
PIL_MODULES = frozenset({"Image", "ImageDraw", "ImageFont", "ImageFilter", "ImageOps", "ImageColor"})

Rule = tuple[str, str | Callable[[re.Match[str]], str]]


def _pil_import(match: re.Match[str]) -> str:
    """``import Image, ImageDraw, random`` -> ``from PIL import Image, ImageDraw`` and ``import random``."""
    indent, names = match.group(1), [n.strip() for n in match.group(2).split(",")]
    pil = [n for n in names if n in PIL_MODULES]
    rest = [n for n in names if n not in PIL_MODULES]
    if not pil:
        return match.group(0)
    lines = [f"{indent}from PIL import {', '.join(pil)}"] + ([f"{indent}import {', '.join(rest)}"] if rest else [])
    return "\n".join(lines)


#: Applied to every program after lib2to3: (pattern, replacement), multiline.
PROGRAM_RULES: list[Rule] = [
    (r"(?<![\w.])file\(", "open("),
    (r"^([ \t]*)import ([\w, \t]+?)[ \t]*$", _pil_import),
    (r"\bdef __([ir]?)div__\(", r"def __\1truediv__("),
    (r"\bis not (\"[^\"\n]*\"|'[^'\n]*')", r"!= \1"),
    (r"\bis (\"[^\"\n]*\"|'[^'\n]*')", r"== \1"),
]

#: Applied to pprocess.py after lib2to3; each must find something.
MODULE_RULES: list[Rule] = [
    (r'\.makefile\("r", 0\)', '.makefile("rb", 0)'),
    (r'\.makefile\("w", 0\)', '.makefile("wb")'),
    (r'os\.fdopen\((\w+), "r", 0\)', r'os.fdopen(\1, "rb", 0)'),
    (r'os\.fdopen\((\w+), "w", 0\)', r'os.fdopen(\1, "wb")'),
]


class Unavailable(RuntimeError):
    """The programs cannot be had here: the tests that run them are skipped, not failed."""


class FetchError(Unavailable):
    """The release could not be downloaded (no network, no index)."""


def download(dest: Path) -> Path:
    """pprocess's source release, downloaded into ``dest`` with pip (or taken from $ZPAR_PPROCESS_SDIST)."""
    dest.mkdir(parents=True, exist_ok=True)
    local = os.environ.get(SDIST_ENV)
    if local:
        sdist = Path(local)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", "--retries", "1", "--timeout", "15", f"pprocess=={VERSION}", "-d", str(dest)]
        try:
            # Within pytest-timeout's minute for the first test, which sets this up: a skip, never a failure.
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=40)
        except subprocess.CalledProcessError as exc:
            tail = "\n".join((exc.stderr or "").strip().splitlines()[-3:])
            raise FetchError(f"pip could not download pprocess=={VERSION}: {tail}") from exc
        except subprocess.TimeoutExpired as exc:
            raise FetchError(f"pip took more than {exc.timeout:.0f} s to download pprocess=={VERSION}") from exc
        sdist = dest / f"pprocess-{VERSION}.tar.gz"
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{sdist} is not pprocess {VERSION} as released on PyPI (sha256 {digest})")
    return sdist


def extract(sdist: Path, dest: Path) -> None:
    """Write the release's programs (``FOLDERS``) and ``pprocess.py`` into ``dest``, without its top folder."""
    top = f"pprocess-{VERSION}/"
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix(top)
            wanted = name == "pprocess.py" or (name.split("/")[0] in FOLDERS and name.endswith(".py"))
            if member.isfile() and member.name.startswith(top) and wanted and ".." not in name.split("/"):
                source = archive.extractfile(member)
                if source is None:
                    raise FileNotFoundError(member.name)
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read())


def lib2to3(files: list[Path]) -> None:
    """Rewrite ``files`` in place with lib2to3's default fixers (as ``python -m lib2to3 -w -n`` does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # lib2to3 is deprecated (and gone in 3.13)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        try:
            from lib2to3 import refactor
        except ModuleNotFoundError as exc:
            raise Unavailable(f"lib2to3, which ports the programs, is not in Python {sys.version.split()[0]}") from exc

        tool = refactor.RefactoringTool(refactor.get_fixers_from_package("lib2to3.fixes"))
        for path in files:
            text = path.read_text()
            path.write_text(str(tool.refactor_string(text if text.endswith("\n") else text + "\n", str(path))))


def apply(rules: list[Rule], text: str) -> tuple[str, list[int]]:
    counts = []
    for pattern, replacement in rules:
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        counts.append(count)
    return text, counts


def port(root: Path) -> None:
    """Port what ``extract`` wrote into ``root``, in place."""
    programs = sorted(p for folder in FOLDERS for p in (root / folder).rglob("*.py"))
    module = root / "pprocess.py"
    lib2to3([*programs, module])
    for path in programs:
        text, _ = apply(PROGRAM_RULES, path.read_text())
        compile(text, str(path), "exec")
        path.write_text(text)
    text, counts = apply(MODULE_RULES, module.read_text())
    missing = [pattern for (pattern, _), count in zip(MODULE_RULES, counts, strict=True) if not count]
    if missing:
        raise ValueError(f"these rules found nothing in pprocess.py: {missing}; is it pprocess {VERSION}?")
    original = root / "original"
    original.mkdir()
    (original / "pprocess.py").write_text(text)
    module.unlink()


def ported(cache: Path) -> Path:
    """The ported release under ``cache`` (made there unless an earlier run did): ``examples/``, ``tests/``, and
    ``original/pprocess.py``. Raises Unavailable (FetchError) if it must be downloaded and cannot be."""
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # a change to the rules makes a new port
    done = cache / f"pprocess-{VERSION}-{key}"
    if (done / ".complete").exists():
        return done
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".partial-") as tmp:
        work = Path(tmp) / "tree"
        work.mkdir()
        extract(download(Path(tmp) / "download"), work)
        port(work)
        (work / ".complete").touch()
        try:
            work.rename(done)
        except OSError:  # another run got there first
            if not (done / ".complete").exists():
                raise
    return done


if __name__ == "__main__":
    print(ported(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())))
