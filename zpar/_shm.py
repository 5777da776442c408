"""Large buffers through shared memory, between processes of one host (the embedded cluster).

``zpar.Client()`` with no address makes a private directory in /dev/shm
(mode 0700, named for the producer's pid), and its hub and workers learn it
from ``ZPAR_SHM_DIR``. A buffer of ``THRESHOLD`` bytes or more then travels
as a file in that directory (mode 0600, created O_EXCL, written with
``pwrite``: a full /dev/shm is an ``OSError`` and the buffer goes by frames,
never a SIGBUS), and only its name and offsets cross the sockets (see
``serialize``). The receiver maps it: no copy on the way.

Who removes a file:

- a task's arguments (the producer's): the producer, when the payload is
  dropped (the task ended: done, failed, cancelled, or the client closed);
  a retry on another worker maps the same file again. Workers map them
  copy-on-write (MAP_PRIVATE): a task may write into its arguments as into
  a ``multiprocessing.Pool`` task's, and the producer's file stays intact.
- a result (a worker's): the producer, right after mapping it (the mapping
  stays valid on Linux); a result dropped unread is removed by ``discard``.
- whatever is left (a worker killed while writing, a producer killed): the
  whole directory goes when the client closes, when the hub exits (it
  outlives its producer by a moment only), and at the next client's start
  (``sweep``: directories of producers that no longer run).

``multiprocessing.shared_memory`` is not used: its resource tracker (a
process per producer) unlinks a segment when the process that made it exits,
and warns about segments another process unlinked.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import re
import shutil
import stat
import weakref
from collections.abc import Sequence
from typing import Any

from . import _ipc

log = logging.getLogger(__name__)

#: Where the segments live (tmpfs on Linux).
ROOT = "/dev/shm"  # noqa: S108 - our own 0700 directory in it, files made O_EXCL 0600, names checked
#: The environment variable that gives the hub and the workers the cluster's directory.
ENV = "ZPAR_SHM_DIR"
#: Buffers at least this large go through shared memory (a round trip measured against frames:
#: about even at 128 KiB, 1.2x faster at 256 KiB, 1.5x at 1 MiB, 2x at 16 MiB).
THRESHOLD = 256 * 1024
_PREFIX = "zpar-"
_ALIGN = 64  # each buffer starts on a cache line
_MAX_WRITE = 1 << 30  # Linux writes at most ~2 GiB per call
_DIR = re.compile(r"zpar-(\d+)-[0-9a-f]+")
_NAME = re.compile(r"zpar-\d+-[0-9a-f]+/\d+-\d+")
_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)


def make_dir() -> str | None:
    """A new private directory for this producer's segments; None if /dev/shm is not there."""
    if not os.path.isdir(ROOT):
        return None
    path = os.path.join(ROOT, f"{_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except OSError as exc:
        log.info("no shared memory for large arguments (%s): they travel by sockets", exc)
        return None
    return path


def remove_dir(path: str | None) -> None:
    """Remove a cluster's directory and every segment in it (mappings stay valid); never another one."""
    if path and path.startswith(ROOT + "/") and _DIR.fullmatch(path[len(ROOT) + 1:]):
        shutil.rmtree(path, ignore_errors=True)


def sweep() -> int:
    """Remove the directories of producers that no longer run (killed without cleaning up)."""
    return _ipc.sweep(_PREFIX, ROOT, _DIR)


def from_environment() -> str | None:
    """The cluster's directory given to this process (and taken out of its environment, so that
    processes a task starts, maybe an agent of another cluster, do not inherit it); None if none."""
    path = os.environ.pop(ENV, None)
    if not path:
        return None
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        log.warning("%s=%s is not a private directory of this user: not using shared memory", ENV, path)
        return None
    return path


class Space:
    """Where one process writes its large buffers: a cluster's directory.

    ``handoff``: the receiver removes each file once mapped (a worker's
    results); otherwise the file lives as long as the frames list ``put``'s
    caller keeps (a producer's arguments, kept for retries).
    """

    def __init__(self, directory: str, handoff: bool) -> None:
        self.directory, self.handoff = directory, handoff
        self._names = itertools.count()
        self._pid = os.getpid()

    def put(self, buffers: Sequence[memoryview]) -> tuple[str, list[int]] | None:
        """Write ``buffers`` into a new segment: ``(path, offsets)``; None if it cannot be made."""
        offsets, end = [], 0
        for buf in buffers:
            offsets.append(end)
            end += -(-buf.nbytes // _ALIGN) * _ALIGN
        while True:
            path = os.path.join(self.directory, f"{self._pid}-{next(self._names)}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue  # left by an earlier process of this pid
            except OSError as exc:  # the directory is gone (the cluster stops), or no file can be made
                log.debug("no shared-memory segment in %s (%s): buffers go as frames", self.directory, exc)
                return None
        try:
            for buf, offset in zip(buffers, offsets, strict=True):
                _write_all(fd, buf, offset)
        except OSError as exc:  # ENOSPC: /dev/shm is full
            log.warning("could not write %d bytes to shared memory (%s): they go by sockets", end, exc)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        finally:
            os.close(fd)
        return path, offsets

    def own(self, frames: list[Any], path: str) -> list[Any]:
        """``frames`` as a list whose being dropped removes the segment at ``path``."""
        owned = _Frames(frames)
        weakref.finalize(owned, _unlink_if_mine, path, self._pid)
        return owned


class _Frames(list):  # type: ignore[type-arg]  # a list, with a weak reference for its finalizer
    """A payload's frames whose segment is removed when the last reference to them goes."""

    __slots__ = ("__weakref__",)


def _write_all(fd: int, buf: memoryview, offset: int) -> None:
    view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:done + _MAX_WRITE], offset + done)


def _unlink_if_mine(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a child forked meanwhile, as it exits: the segment is its parent's
        _unlink(path)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


_links = itertools.count(1 << 40)  # names of links (``link``): far from any Space's own counter


def link(path: str) -> str | None:
    """A second name for the segment at ``path``, in its directory (a hard link: nothing is copied), so it
    outlives its first name's removal; None if it cannot be made. The embedded broker keeps a task's value
    this way for the tasks that take it, while its producer maps and removes the first name."""
    directory = os.path.dirname(_checked(path))
    while True:
        name = os.path.join(directory, f"{os.getpid()}-{next(_links)}")
        try:
            os.link(path, name, follow_symlinks=False)
            return name
        except FileExistsError:
            continue
        except OSError as exc:
            log.debug("no link to %s (%s): the value is copied", path, exc)
            return None


def _checked(path: str) -> str:
    """``path`` if it names a segment of a zpar directory in ROOT, else ValueError (never another file)."""
    if not path.startswith(ROOT + "/") or not _NAME.fullmatch(path[len(ROOT) + 1:]):
        raise ValueError(f"{path!r} is not a zpar shared-memory segment")
    return path


def attach(path: str, handoff: bool) -> mmap.mmap:
    """Map the segment at ``path``: shared and writable if handed off (it is removed now: ours alone),
    else copy-on-write (the sender's file stays as it was). Raises OSError or ValueError."""
    fd = os.open(_checked(path), (os.O_RDWR if handoff else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError(f"{path!r} is not a shared-memory segment of this user")
        if handoff:  # populated now: the value is read whole, and faults are cheaper in one go
            return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        return mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        if handoff:
            _unlink(path)


def discard(path: str) -> None:
    """Remove a handed-off segment nobody will map (its result was dropped)."""
    with contextlib.suppress(ValueError):
        _unlink(_checked(path))
