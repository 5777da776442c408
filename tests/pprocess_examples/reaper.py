"""Run one example program and make sure nothing it started outlives it.

``python reaper.py [--detach PIDFILE] -- COMMAND...``: runs COMMAND in a new
session, as a child subreaper (Linux), so every process it leaves behind
(forked children, background processes, embedded clusters) becomes this
process's child once its parent is gone. After COMMAND exits, it reaps them
as they exit; those still alive after GRACE seconds are killed, and the exit
code is then 99 (their command lines on stderr). Otherwise it exits with
COMMAND's code (128 + the signal, if a signal ended it).

``--detach PIDFILE``: write the pids left behind to PIDFILE and exit at once
(a background call that another run collects later). SIGINT and SIGTERM are
passed on to COMMAND's process group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import psutil

PR_SET_CHILD_SUBREAPER = 36
GRACE = 20


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError


def main(argv: list[str]) -> int:
    pidfile = None
    if argv[:1] == ["--detach"]:
        pidfile, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("reaper: cannot become a child subreaper", file=sys.stderr)
        return 98
    child = subprocess.Popen(argv, start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = child.wait()
    code = 128 - code if code < 0 else code
    left = psutil.Process().children(recursive=True)
    if pidfile is not None:
        with open(pidfile, "w") as f:
            f.write("".join(f"{proc.pid} {proc.create_time()}\n" for proc in left))
        return code
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(GRACE)
    killed = []
    while True:
        try:
            os.waitpid(-1, 0)  # each exit wakes us: no polling
        except ChildProcessError:
            break
        except TimeoutError:
            for proc in psutil.Process().children(recursive=True):
                try:
                    killed.append(" ".join(proc.cmdline())[:200])
                    proc.kill()
                except psutil.Error:
                    pass
    signal.alarm(0)
    if killed:
        print(f"reaper: killed {len(killed)} process(es) left after {GRACE} s:", *killed, sep="\n  ",
              file=sys.stderr)
        return 99
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
