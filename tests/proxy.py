"""A TCP proxy on loopback that can partition the network: it stops moving bytes, then resumes.

While partitioned it reads nothing, so TCP buffers fill and nothing is
delivered, as when packets are dropped and retransmitted later; after
``heal()`` the queued bytes flow on. Used to cut one agent off its broker.
"""

from __future__ import annotations

import selectors
import socket
import threading


class PartitionProxy:
    def __init__(self, listen_host: str, upstream_host: str, ports: list[int]) -> None:
        self.upstream_host = upstream_host
        self.connected = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._listeners = []
        for port in ports:
            lsock = socket.socket()
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((listen_host, port))
            lsock.listen()
            lsock.setblocking(False)
            self._sel.register(lsock, selectors.EVENT_READ, ("accept", port))
            self._listeners.append(lsock)
        self._thread = threading.Thread(target=self._run, name="partition-proxy", daemon=True)
        self._thread.start()

    def partition(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._stop.set()
        self._flowing.set()
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._flowing.is_set():
                self._flowing.wait(0.05)
                continue
            for key, _ in self._sel.select(0.05):
                kind, data = key.data
                if kind == "accept":
                    self._accept(key.fileobj, data)
                else:
                    self._pump(key.fileobj, data)

    def _accept(self, lsock: socket.socket, port: int) -> None:
        client, _ = lsock.accept()
        upstream = socket.create_connection((self.upstream_host, port))
        for a, b in ((client, upstream), (upstream, client)):
            a.setblocking(False)
            self._sel.register(a, selectors.EVENT_READ, ("pump", b))
        self.connected.set()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            chunk = src.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            for s in (src, dst):
                try:
                    self._sel.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()
            return
        dst.setblocking(True)
        try:
            dst.sendall(chunk)
        except OSError:
            pass
        finally:
            dst.setblocking(False)
