"""Run pprocess's example programs, as port.py ported them, with the original pprocess or zpar.pprocess.

Each run copies the program's folder (from the ported release, see port.py)
to a work directory and makes two kinds of edits, the same for both
libraries, each a pattern for a named constant or a call:

- sizes, so that a run takes a second or two: N = 4 instead of 10, a delay
  of 0.02 s instead of 1 s, a limit of 4 instead of 10, PyGmy's image 24 x 12
  instead of 300 x 200, the heartbeat every 200 ms instead of 5 s;
  PyGmy seeds ``random`` with the row's number before it draws the row: its
  occlusion samples are random, and Python 3 reseeds ``random`` in every
  forked child, so the original's image differs from run to run otherwise
  (with it, the images of the two libraries are compared pixel for pixel);
  bottles follows files in the work directory instead of /tmp/test*;
- for zpar, the import: ``import pprocess`` becomes
  ``import zpar.pprocess as pprocess`` (and ``from pprocess import`` becomes
  ``from zpar.pprocess import``): the one change a user makes.

The program runs under reaper.py (nothing it starts may outlive it). What it
prints is then normalised where runs differ by nature: the "Time taken:" line,
lines whose order depends on which process gets there first (two_way), the
order in which an index was filled (start_indexer), and the rows PyGmy drew
in arrival order.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pty
import queue
import re
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected"
STUBS = HERE / "_stubs"

SIMPLE_SIZES = ((r"^N = 10$", "N = 4"), (r"^delay = 1$", "delay = 0.02"), (r"^limit = 10$", "limit = 4"))
PYGMY_SIZES = ((r"world\(300,200\)", "world(24,12)"),
               (r"^        row = \[\]$", "        random.seed(sy)\n        row = []"))
#: start_indexer's corpus and what is typed at its prompt.
CORPUS = {f"text{i}.txt": " ".join(f"{w}{i % 3}" for w in ("alpha", "beta", "gamma", "alps", "bet")) + " the end"
          for i in range(8)}
PATTERNS = "al\nbe\nthe\nzz\ngamma1\n"


@dataclass(frozen=True)
class Example:
    """One program: its path in the release, its arguments, and how its output is compared."""

    path: str
    args: tuple[str, ...] = ()
    sizes: tuple[tuple[str, str], ...] = SIMPLE_SIZES
    unbuffered: bool = True  # children's output not lost at os._exit, in the order it was written
    tty: bool = False  # standard output a terminal: line-buffered, so two processes' lines never mix within one
    compare: str = "lines"  # lines | speakers | index | pygmy | bottles
    stdin: str = ""
    steps: tuple[tuple[str, ...], ...] = field(default=())  # runs of one program, in one work directory


#: pprocess 0.5.1's examples/simple*.py.
SIMPLE = ("simple", "simple1", "simple2", "simple_background_queue", "simple_continuous_queue", "simple_create",
          "simple_create_map", "simple_create_queue", "simple_managed", "simple_managed_map",
          "simple_managed_map_reusable", "simple_managed_queue", "simple_map", "simple_persistent_managed",
          "simple_persistent_queue", "simple_pmap", "simple_pmap_iter", "simple_start", "simple_start_queue")
#: Modules of the release that are not programs: imported by them.
HELPERS = ("tests/Dict.py", "examples/PyGmy/ppygmy.py", "examples/PyGmy/ppygmy_pmap.py",
           "examples/PyGmy/ppygmy_queue.py", "examples/PyGmy/ppygmy_reuse.py")


def _examples() -> list[Example]:
    simple = [f"examples/{name}.py" for name in SIMPLE]
    # The persistent ones print in their background process after it detached its streams: run them
    # block-buffered, as a pipe does (unbuffered, the original fails writing to a closed descriptor).
    detached = {"simple_background_queue", "simple_persistent_managed", "simple_persistent_queue"}
    found = [Example(p, unbuffered=Path(p).stem not in detached) for p in simple]
    found += [Example(p, steps=(("--start",), ("--reconnect",)), unbuffered=False)
              for p in simple if Path(p).stem in detached]
    found += [
        Example("tests/create_loop.py", sizes=()),
        Example("tests/start_loop.py", sizes=()),
        Example("tests/two_way.py", sizes=(), compare="speakers", unbuffered=False, tty=True),
        Example("tests/start_indexer.py", args=("{workdir}/corpus", "4", "2"), sizes=(), compare="index",
                stdin=PATTERNS),
    ]
    found += [Example(f"examples/PyGmy/{name}.py", args=(limit,), sizes=PYGMY_SIZES, compare="pygmy")
              for name, limit in (("scene", "2"), ("scene_pmap", "2"), ("scene_queue", "2"), ("scene_reuse", "2"))]
    found += [Example(f"examples/concurrency-sig/{name}.py", compare="bottles",
                      sizes=((r"'/tmp/test", "'{workdir}/test"), (r"delay=5000", "delay=200")))
              for name in ("bottles", "bottles_heartbeat")]
    return found


EXAMPLES = _examples()


def example_id(example: Example) -> str:
    stem = example.path.removesuffix(".py").replace("/", "-")
    return stem + ("-split" if example.steps else "")


# ---------------------------------------------------------------------- preparing and running


def prepare(example: Example, library: str, workdir: Path, programs: Path) -> Path:
    """Copy the program's folder (from ``programs``, the ported release) into ``workdir`` with the edits; the
    script's path there."""
    source = programs / example.path
    found = [0] * len(example.sizes)
    for module in sorted(source.parent.glob("*.py")):
        text = module.read_text()
        for i, (pattern, replacement) in enumerate(example.sizes):
            text, count = re.subn(pattern, replacement.replace("{workdir}", str(workdir)), text, flags=re.M)
            found[i] += count
        if library == "zpar":
            text = re.sub(r"^import pprocess$", "import zpar.pprocess as pprocess", text, flags=re.M)
            text = re.sub(r"^from pprocess import", "from zpar.pprocess import", text, flags=re.M)
        (workdir / module.name).write_text(text)
    missing = [pattern for (pattern, _), count in zip(example.sizes, found, strict=True) if not count]
    if missing:
        raise ValueError(f"{example.path}: nothing to resize for {missing}; is this pprocess 0.5.1?")
    if example.compare == "index":
        (workdir / "corpus").mkdir()
        for name, text in CORPUS.items():
            (workdir / "corpus" / name).write_text(text)
    if example.compare == "bottles":
        for name in ("test", "test2", "test3"):
            (workdir / name).touch()
    return workdir / source.name


def environment(example: Example, library: str, original: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ZPAR_"))}
    paths = [str(STUBS)] if example.compare == "pygmy" else []
    if library == "original":
        if original is None:
            raise ValueError("the original pprocess's folder is needed (port.py writes it)")
        paths.append(str(original))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if example.unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    output: list[str]  # normalised


def command(script: Path, args: tuple[str, ...], workdir: Path, pidfile: Path | None = None) -> list[str]:
    detach = ["--detach", str(pidfile)] if pidfile else []
    return [sys.executable, str(HERE / "reaper.py"), *detach, "--", sys.executable, str(script),
            *(a.replace("{workdir}", str(workdir)) for a in args)]


def run(example: Example, library: str, workdir: Path, programs: Path, original: Path | None = None,
        timeout: float = 50) -> Run:
    """Run the example once (or its steps, in order) with ``library``: "zpar" or "original" (whose folder is
    ``original``); ``programs`` is the ported release."""
    script = prepare(example, library, workdir, programs)
    env = environment(example, library, original)
    if example.compare == "bottles":
        return _drive_bottles(command(script, example.args, workdir), env, workdir, timeout)
    if example.tty:
        code, out, err = _run_on_a_terminal(command(script, example.args, workdir), env, workdir, timeout)
        return Run(code, out, err, normalise(example, out, workdir))
    if not example.steps:
        proc = subprocess.run(command(script, example.args, workdir), cwd=workdir, env=env, input=example.stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)
        return Run(proc.returncode, proc.stdout, proc.stderr, normalise(example, proc.stdout, workdir))
    codes, outs, errs, pidfile = [], [], [], workdir / "left.pids"
    for i, step in enumerate(example.steps):
        last = i == len(example.steps) - 1
        proc = subprocess.run(command(script, step, workdir, None if last else pidfile), cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        codes.append(proc.returncode)
        outs.append(proc.stdout)
        errs.append(proc.stderr)
    errs.append(_wait_for_detached(pidfile, timeout))
    output = [line for out in outs for line in normalise(example, out, workdir)]
    return Run(max(codes) if any(codes) else 0, "".join(outs), "".join(errs), output)


def _run_on_a_terminal(cmd: list[str], env: dict[str, str], workdir: Path, timeout: float) -> tuple[int, str, str]:
    """Run with a pseudo-terminal as standard output (newlines kept as they are); exit code, output, errors."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(slave)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    reader.join(timeout)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(), err


def _wait_for_detached(pidfile: Path, timeout: float) -> str:
    """The processes an earlier step left behind must have ended with the last step; kill those that did not."""
    import psutil

    procs = []
    for line in pidfile.read_text().split("\n") if pidfile.exists() else ():
        if line:
            pid, started = line.split()
            try:
                proc = psutil.Process(int(pid))
                if abs(proc.create_time() - float(started)) < 0.01:
                    procs.append(proc)
            except psutil.NoSuchProcess:
                continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        proc.kill()
    return "".join(f"left running: pid {proc.pid}\n" for proc in alive)


# ---------------------------------------------------------------------- normalising


def normalise(example: Example, stdout: str, workdir: Path) -> list[str]:
    stdout = stdout.replace(str(workdir), "{workdir}")
    if example.compare == "pygmy":
        return _pygmy(stdout, workdir)
    lines = [re.sub(r"^(\s*Time taken:).*", r"\1 (s)", line) for line in stdout.split("\n")]
    if example.compare == "speakers":  # each side's lines in its own order; the two sides interleave as they may
        lines.sort(key=lambda line: line.split(":")[0].split(" ")[0])
    if example.compare == "index":
        lines = [_index_line(line) for line in lines]
    return lines


def _index_line(line: str) -> str:
    prompt, brace, rest = line.partition("{")
    if not brace:
        return line
    found = ast.literal_eval(brace + rest)
    return prompt + repr({word: sorted(files) for word, files in sorted(found.items())})


def _pygmy(stdout: str, workdir: Path) -> list[str]:
    head, *updates = stdout.split("\b" * 9)
    percents = [u.split("%")[0].strip() for u in updates]
    rows = sorted(int(u.split("%")[1]) for u in updates)
    image = workdir / "test.tif"
    digest = hashlib.sha256(image.read_bytes()).hexdigest() if image.exists() else "no image"
    return [*head.split("\n"), "percent: " + " ".join(percents), "rows: " + " ".join(map(str, rows)),
            "image: " + digest]


# ---------------------------------------------------------------------- bottles: follow files, print what matches

#: Lines written to the followed files, one at a time, and the words whose grep prints them.
BOTTLES = [("test", "a pair of pants"), ("test2", "socks and shoes"), ("test3", "trousers and shorts"),
           ("test", "shorts, no trousers"), ("test2", "pants"), ("test3", "nothing to wear"),
           ("test", "PANTS in capitals"), ("test2", "short trousers and long pants")]
WORDS = ("pants", "trousers", "shorts")


def _drive_bottles(cmd: list[str], env: dict[str, str], workdir: Path, timeout: float) -> Run:
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    threading.Thread(target=lambda: errors.append(proc.stderr.read() if proc.stderr else ""), daemon=True).start()
    heartbeats = 0

    def next_line(deadline: float) -> str | None:
        nonlocal heartbeats
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                raise EOFError("the program ended: " + "".join(errors))
            if line.startswith("No input received for"):
                heartbeats += 1
                continue
            return line

    def write(name: str, text: str) -> None:
        with open(workdir / name, "a") as f:
            f.write(text + "\n")

    transcript: list[str] = []
    try:
        # Each follower starts at the end of its file: write markers until every grep has seen every file.
        seen: set[tuple[str, str]] = set()
        deadline = time.monotonic() + timeout / 2
        for k in range(1000):
            for name in ("test", "test2", "test3"):
                for word in WORDS:
                    if (word, name) not in seen:
                        write(name, f"{word} ready {name} {k}")
            settle = min(deadline, time.monotonic() + 1.0)
            while (line := next_line(settle)) is not None:
                parts = line.split(" ")
                if len(parts) == 4 and parts[1] == "ready":
                    seen.add((parts[0], parts[2]))
            if len(seen) == 9 or time.monotonic() >= deadline:
                break
        transcript.append(f"followers ready: {len(seen)} of 9")
        for name, text in BOTTLES:
            write(name, text)
            expected = sum(bool(re.match(f".*{word}.*", text)) for word in WORDS)
            got = [line for _ in range(expected) if (line := next_line(time.monotonic() + 20)) is not None]
            transcript.append(f"{name} <- {text!r}: " + " | ".join(sorted(got)))
        for name in ("test", "test2", "test3"):  # anything printed by mistake would be in by now
            write(name, f"pants trousers shorts end {name}")
            got = [line for _ in range(3) if (line := next_line(time.monotonic() + 20)) is not None]
            transcript.append(f"{name} end: " + " | ".join(sorted(got)))
        transcript.append("heartbeats: " + ("some" if heartbeats else "none"))
    finally:
        proc.send_signal(signal.SIGINT)  # the reaper passes it on to the program's process group
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return Run(proc.returncode, "\n".join(transcript), "".join(errors), transcript)


def _pump(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line.rstrip("\n"))
    lines.put(None)


# ---------------------------------------------------------------------- expected outputs


def expected_path(example: Example) -> Path:
    return EXPECTED / f"{example_id(example)}.json"


def load_expected(example: Example) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(expected_path(example).read_text())
    return loaded


def save_expected(example: Example, result: Run) -> None:
    EXPECTED.mkdir(exist_ok=True)
    record = {"returncode": result.returncode, "output": result.output}
    expected_path(example).write_text(json.dumps(record, indent=1) + "\n")


def fresh_workdir(base: Path, example: Example, library: str) -> Path:
    workdir = base / f"{example_id(example)}-{library}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir
