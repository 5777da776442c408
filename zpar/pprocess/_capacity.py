"""Workers for calls that hold one: this machine's pprocess pool, and the way nested exchanges reach it.

pprocess gives every call a process of its own, so calls that never end, or
that wait for one another, all run at once. A zpar worker runs one call at a
time; a call that holds its worker for as long as it lives (a channel-aware
call, which may wait for messages or never end, and any call of an exchange
with a ``limit``) therefore gets a worker *reserved* for it, and the pool
starts workers when none is free:

- ``LocalPool`` (in the program that uses the embedded default) keeps
  *shards*: embedded clusters started as reservations need them, the first
  sized for the exchange's limit (at least one worker per core), later ones
  doubling the pool. Shards stay until ``shutdown()`` or exit.
- A reservation is a ``Slot``: free again once its call's task has ended (the
  pool counts live slots when it next reserves: nothing runs in the client's
  I/O thread).
- A call's own exchanges (nested, running in a worker) reserve through the
  pool's *service*: a Unix socket in a private directory, answered by a
  thread of the program that owns the pool. Its address travels with every
  call (``Where``); a worker connects once (``PoolLink``) and runs its calls
  on the shards the owner names, so a nested exchange never starts a cluster
  inside a worker. What a worker's connection reserved is freed when it
  says so, or when the connection closes (the worker died).

The service's lines: ``R <hint>`` reserves (answer: the shard's frontend),
``F <frontend>`` frees one, ``S`` asks for the cluster of calls that hold no
worker (answer: its frontend); an answer starting with ``!`` is an error.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .._ipc import private_dir
from ..client import Client
from ..errors import ZparError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Where:
    """The cluster a call runs on, for the exchanges it uses itself (shipped with the call).

    ``pool``: ``address`` is a LocalPool's service (this machine's pool);
    otherwise it is a cluster's frontend, ``insecure`` for an embedded one
    (plain ipc in a private directory, as its own client talks to it).
    """

    address: str
    pool: bool = False
    insecure: bool = False

    @classmethod
    def of(cls, client: Client) -> Where:
        return cls(client.address, pool=False, insecure=client.embedded)


class Slot:
    """A worker reserved for one call, and for the call it hands over to, until that call's task ends."""

    __slots__ = ("address", "client", "future", "released", "where")

    def __init__(self, client: Client, address: str, where: Where) -> None:
        self.client = client
        self.address = address
        self.where = where
        self.future: Future[Any] | None = None  # None while the call is being started
        self.released = False

    def live(self) -> bool:
        return not self.released and (self.future is None or not self.future.done())

    def release(self) -> None:
        """Free it now (a call that could not start)."""
        self.released = True


class _Shard:
    def __init__(self, client: Client, workers: int) -> None:
        self.client = client
        self.workers = workers
        self.slots: list[Slot] = []  # this process's reservations
        self.remote = 0  # reservations held by nested exchanges, through the service

    def free(self) -> int:
        self.slots = [slot for slot in self.slots if slot.live()]
        return self.workers - len(self.slots) - self.remote


class LocalPool:
    """This machine's workers for calls that hold one: embedded clusters started as reservations need them."""

    def __init__(self, cores: int, shared: Callable[[], Client]) -> None:
        self._cores = max(1, cores)
        self._shared = shared  # the cluster of calls that hold no worker (zpar._default's)
        self._lock = threading.Lock()  # the shards' counts
        self._grow = threading.Lock()  # one reservation at a time may start a shard
        self._shards: list[_Shard] = []
        self._closed = False
        self.dir = private_dir("zpar-pprocess-")
        self._service = _Service(os.path.join(self.dir, "pool"), self)
        self.where = Where(self._service.path, pool=True, insecure=True)

    def reserve(self, hint: int = 1) -> Slot:
        """A worker for one call; a new shard of ``max(cores, hint, the pool's size)`` workers if none is free."""
        shard = self._take(hint)
        slot = Slot(shard.client, shard.client.address, self.where)
        with self._lock:
            shard.slots.append(slot)
        return slot

    def reserve_remote(self, hint: int) -> str:
        """For a nested exchange: a shard's frontend, counted until ``free_remote``."""
        shard = self._take(hint, remote=True)
        return shard.client.address

    def free_remote(self, address: str, count: int = 1) -> None:
        with self._lock:
            for shard in self._shards:
                if shard.client.address == address:
                    shard.remote = max(0, shard.remote - count)

    def shared_address(self) -> str:
        return self._shared().address

    def _take(self, hint: int, remote: bool = False) -> _Shard:
        with self._grow:
            with self._lock:
                if self._closed:
                    raise ZparError("this zpar.pprocess pool was shut down; its calls cannot start")
                for shard in self._shards:
                    if shard.free() > 0 and not shard.client.closed:
                        if remote:
                            shard.remote += 1
                        return shard
                size = max(self._cores, hint, sum(shard.workers for shard in self._shards))
            log.debug("zpar.pprocess: starting %d workers for calls that hold one", size)
            shard = _Shard(Client(workers=size), size)
            with self._lock:
                self._shards.append(shard)
                if remote:
                    shard.remote += 1
            return shard

    def workers(self) -> int:
        """How many workers the shards have."""
        with self._lock:
            return sum(shard.workers for shard in self._shards)

    def close(self) -> None:
        """Stop the service and every shard (their calls with them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            shards, self._shards = self._shards, []
        self._service.close()
        for shard in shards:
            shard.client.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class _Service:
    """The pool's Unix socket, answered by one thread: reservations for the nested exchanges of its calls."""

    def __init__(self, path: str, pool: LocalPool) -> None:
        self.path = path
        self._pool = pool
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)  # in a 0700 directory: only this user reaches it
        self._listener.listen(16)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._held: dict[socket.socket, dict[str, int]] = {}  # per connection: frontend -> reservations
        self._buffers: dict[socket.socket, bytes] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="zpar-pprocess-pool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, _ in self._selector.select():
                    sock: Any = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        return
                    else:
                        self._read(sock)
        finally:
            for conn in list(self._held):
                self._drop(conn)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self._held[conn] = {}
        self._buffers[conn] = b""
        self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf = self._buffers[conn] + data
        *lines, self._buffers[conn] = buf.split(b"\n")
        for line in lines:
            answer = self._answer(conn, line.decode())
            if answer is not None:
                try:
                    conn.sendall(answer.encode() + b"\n")
                except OSError:
                    self._drop(conn)
                    return

    def _answer(self, conn: socket.socket, line: str) -> str | None:
        verb, _, arg = line.partition(" ")
        try:
            if verb == "R":
                address = self._pool.reserve_remote(max(1, int(arg or "1")))
                held = self._held[conn]
                held[address] = held.get(address, 0) + 1
                return address
            if verb == "F":
                held = self._held[conn]
                if held.get(arg, 0) > 0:
                    held[arg] -= 1
                    self._pool.free_remote(arg)
                return None
            if verb == "S":
                return self._pool.shared_address()
            return f"!unknown request {verb!r}"
        except Exception as exc:  # noqa: BLE001 - the asker raises it; the service goes on
            log.warning("zpar.pprocess pool: %s failed: %s", verb, exc)
            return f"!{type(exc).__name__}: {exc}".replace("\n", " ")

    def _drop(self, conn: socket.socket) -> None:
        for address, count in self._held.pop(conn, {}).items():
            if count:
                self._pool.free_remote(address, count)
        self._buffers.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def close(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(10)
        self._wake_w.close()


class PoolLink:
    """In a worker: the pool of the program that started the call, reached through its service."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._lock = threading.Lock()
        self._buf = b""
        self._slots: list[Slot] = []
        self._where = Where(path, pool=True, insecure=True)

    def _ask(self, line: str) -> str:
        self._sock.sendall(line.encode() + b"\n")
        while b"\n" not in self._buf:
            data = self._sock.recv(4096)
            if not data:
                raise ZparError(f"the zpar.pprocess pool at {self.path} has gone (its program ended?)")
            self._buf += data
        answer, _, self._buf = self._buf.partition(b"\n")
        text = answer.decode()
        if text.startswith("!"):
            raise ZparError(f"the zpar.pprocess pool at {self.path} could not do it: {text[1:]}")
        return text

    def reserve(self, hint: int) -> Slot:
        with self._lock:
            self._flush()
            address = self._ask(f"R {hint}")
            slot = Slot(client_at(address, insecure=True), address, self._where)
            self._slots.append(slot)
            return slot

    def shared(self) -> Client:
        with self._lock:
            return client_at(self._ask("S"), insecure=True)

    def flush(self) -> None:
        """Tell the pool which reservations have ended."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        ended = [slot for slot in self._slots if not slot.live()]
        if not ended:
            return
        self._slots = [slot for slot in self._slots if slot.live()]
        self._sock.sendall(b"".join(f"F {slot.address}\n".encode() for slot in ended))

    def close(self) -> None:
        self._sock.close()


class _Cache:
    """In this process: clients of the clusters that calls started elsewhere run on, and links to pools."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: dict[str, Client] = {}  # by frontend
        self.links: dict[str, PoolLink] = {}  # by service path


_cache = _Cache()


def client_at(address: str, insecure: bool) -> Client:
    """This process's client of the cluster at ``address`` (made on first need, kept until exit)."""
    with _cache.lock:
        client = _cache.clients.get(address)
        if client is None or client.closed:
            # An embedded cluster's frontend is plain ipc in a private directory, as for its own client;
            # a cluster's frontend takes this node's credentials (ZPAR_SECRET..., or this user's secret).
            client = Client(address, insecure=insecure) if insecure else Client(address)
            _cache.clients[address] = client
        return client


def link(path: str) -> PoolLink:
    """This process's link to the pool whose service is at ``path``."""
    with _cache.lock:
        found = _cache.links.get(path)
        if found is None:
            found = _cache.links[path] = PoolLink(path)
        return found


def flush_links() -> None:
    """Tell each pool this process reserved workers from which reservations have ended."""
    for found in list(_cache.links.values()):
        try:
            found.flush()
        except OSError as exc:
            log.debug("zpar.pprocess: could not reach the pool at %s: %s", found.path, exc)


def has_links() -> bool:
    return bool(_cache.links)


def forget() -> None:
    """In a forked child: the parent's clients and links are not ours (their threads did not survive)."""
    _cache.__init__()  # type: ignore[misc]  # a fresh lock too: another thread may have held it at the fork
