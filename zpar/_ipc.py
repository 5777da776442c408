"""ipc endpoints only this user can reach: socket files 0600, private directories 0700.

A Unix socket file takes its mode from the umask when ``bind()`` creates it,
and ``connect()`` needs write permission on it: under umask 002 the group
could connect. ``bind`` makes the file 0600 whatever the umask.

The race it closes. libzmq binds *and listens* inside ``zmq_bind``, in the
calling thread, so a ``chmod`` after the bind leaves a window in which a
peer can connect, and a connection accepted then outlives the chmod. So the
umask is set to 0177 around the bind: the kernel creates the file 0600, with
no window. The umask is per process, so for those microseconds another
thread creating a file gets a stricter mode (never a looser one); our
daemons bind on the loop's thread while they are built, before any worker
or thread of theirs exists (ZeroMQ's I/O threads create no files). A lock
serialises our own binds, so two never save each other's umask. The chmod
after the bind stays: a default ACL on the directory overrides the umask.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zmq

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
DIR_MODE = 0o700

_umask_lock = threading.Lock()  # os.umask is per process: one bind at a time changes it


def private_dir(prefix: str) -> str:
    """A new directory only this user can enter (0700, whatever the umask), named ``{prefix}{pid}-{random}``:
    ``sweep`` removes it if this process dies without doing so (SIGKILL)."""
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")  # 0700 & ~umask: never looser, maybe stricter
    os.chmod(path, DIR_MODE)
    return path


def sweep(prefix: str, root: str | None = None, name: re.Pattern[str] | None = None) -> int:
    """Remove the directories ``private_dir(prefix)`` made in ``root`` (the temporary directory) for processes
    of this user that no longer run; how many. ``name``: the exact names to consider (the pid its group 1)."""
    pattern = name or re.compile(re.escape(prefix) + r"(\d+)-\w+")
    uid = os.getuid()
    removed = 0
    try:
        entries = os.scandir(root or tempfile.gettempdir())
    except OSError:
        return 0
    with entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            try:
                if match is None or entry.stat(follow_symlinks=False).st_uid != uid or alive(int(match[1])):
                    continue
            except OSError:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d directories %s* of zpar processes that had died", removed, prefix)
    return removed


def alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (another user's counts: not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ipc_path(endpoint: str) -> str | None:
    """The file of an ``ipc://`` endpoint; None for other transports and the abstract namespace."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    return None if path.startswith("@") else path


def bind(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """``sock.bind(endpoint)``; an ipc socket file is created mode 0600, so only this user connects.

    Raises what ``bind`` raises (``zmq.ZMQError``), and ``OSError`` if the
    file's mode cannot be made 0600 (the socket is unbound then).
    """
    if not endpoint.startswith("ipc://"):
        sock.bind(endpoint)
        return
    if ipc_path(endpoint) is None:
        log.warning("ipc endpoint %s is in the abstract namespace: any local user can connect to it", endpoint)
        sock.bind(endpoint)
        return
    with _umask_lock:
        previous = os.umask(0o177)
        try:
            sock.bind(endpoint)
        finally:
            os.umask(previous)
    import zmq  # here: private_dir is imported by a worker's earliest start (zpar.agent.spawn), before zmq

    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # ipc://* names its file only now
    path = ipc_path(bound) or ""
    try:
        os.chmod(path, SOCKET_MODE)
        if stat.S_IMODE(os.stat(path).st_mode) != SOCKET_MODE:
            raise OSError(f"{path} is not mode 0600 after chmod")
    except OSError as exc:
        sock.unbind(bound)
        raise OSError(f"cannot make the ipc socket {path} private (mode 0600): {exc}") from None
