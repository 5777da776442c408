"""The broker's HTTP side (``--dashboard HOST:PORT``): ``/api/status`` as JSON and ``/metrics`` for
Prometheus, to holders of its token only.

A thread of its own serves the port (``http.server``); it never touches the broker's state. Each request is
a question put to the broker's loop (``Questions``: a queue, and a socket pair the loop polls), answered
there with plain data and rendered here. So the loop pays only for what is asked, when it is asked.

The token: with CurveZMQ, derived from the broker's own secret key (``token_for``), so it survives
restarts and every producer admitted gets it in ``zpar status``; without keys, made at random at
start. It goes in an ``Authorization: Bearer`` header or a ``?token=`` query (the link in the log and
in ``zpar status``, as Jupyter does); without it, 401 and no data.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import queue
import secrets
import socket
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from zpar import security

log = logging.getLogger(__name__)

#: Seconds a request waits for the broker's loop to answer (a loop that busy is itself news: 503).
ANSWER_TIMEOUT = 5.0

_ENDPOINTS = {
    "/api/status": "the broker's status as JSON: what `zpar status --json` prints",
    "/api/tasks": "the latest tasks that ended, newest first (?limit=N, at most 10,000; ?failed=1: only failures)",
    "/metrics": "Prometheus metrics (text exposition format)",
}


def token_for(creds: security.BrokerCredentials | None) -> str:
    """The dashboard's token: derived from the broker's frontend secret key, else random."""
    key = creds.keys.get("frontend") if creds is not None else None
    if key is None or key.secret is None:
        return secrets.token_hex(16)
    return hmac.new(key.secret, b"zpar dashboard token", hashlib.sha256).hexdigest()[:32]


class Questions:
    """Questions from the HTTP threads to the broker's loop, and their answers.

    ``ask`` (any thread) queues a question and wakes the loop through a socket
    pair it polls (``fileno``); the loop calls ``answer`` with a function that
    answers one, and each answer goes back on the asker's own queue.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, queue.SimpleQueue[Any]]] = queue.SimpleQueue()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def ask(self, what: Any, timeout: float = ANSWER_TIMEOUT) -> Any:
        """The loop's answer to ``what``; raises queue.Empty after ``timeout`` s, or what answering raised."""
        reply: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queue.put((what, reply))
        try:
            self._w.send(b"\0")
        except OSError:  # full: a wake-up is pending anyway
            pass
        answer = reply.get(timeout=timeout)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def answer(self, respond: Callable[[Any], Any]) -> None:
        """The loop's part: answer every question waiting."""
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                what, reply = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                reply.put(respond(what))
            except Exception as exc:
                log.exception("error answering %s for the dashboard", what)
                reply.put(exc)

    def close(self) -> None:
        self._r.close()
        self._w.close()


class Dashboard:
    """The HTTP server, on a thread of its own; ``link`` is its address with the token."""

    def __init__(self, host: str, port: int, token: str, questions: Questions, *, fallback: bool = False) -> None:
        address = f"{host}:{port}"
        try:
            self._httpd = _Server((host, port), _Handler)
        except OSError as exc:
            if not fallback:
                raise OSError(f"cannot serve the dashboard on {address}: {exc.strerror or exc}; pick another "
                              "--dashboard HOST:PORT, or --dashboard off") from None
            self._httpd = _Server((host, 0), _Handler)  # the default port is taken (another broker): any
            log.warning("dashboard port %d is taken; serving it on %d", port, self._httpd.server_address[1])
        self._httpd.token, self._httpd.questions = token, questions
        port = int(self._httpd.server_address[1])
        shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - reads, binds nothing
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
        self.link = f"{self.url}?token={token}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="zpar-dashboard", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _task_query(query: dict[str, list[str]]) -> dict[str, Any]:
    """``?limit=N&failed=1`` as BrokerCore.tasks' arguments (a bad limit: the default)."""
    limit = query.get("limit", ["100"])[0]
    return {"limit": int(limit) if limit.isdigit() else 100,
            "failed": query.get("failed", ["0"])[0].lower() in ("1", "true", "yes")}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    token = ""
    questions: Questions

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "zpar-broker"
    sys_version = ""

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if not self._authorized(urllib.parse.parse_qs(url.query).get("token", [""])[0]):
            self._send(401, b'{"error": "this needs the dashboard token: the link in the broker\'s log or in '
                            b'`zpar status`, or an Authorization: Bearer header"}\n', "application/json",
                       {"WWW-Authenticate": 'Bearer realm="zpar"'})
            return
        try:
            ask = self.server.questions.ask
            if url.path == "/api/status":
                self._json(ask(("status", {})))
            elif url.path == "/api/tasks":
                self._json(ask(("tasks", _task_query(urllib.parse.parse_qs(url.query)))))
            elif url.path == "/metrics":
                from .metrics import render  # prometheus-client is loaded only when asked for

                self._send(200, *render(ask(("metrics", {}))))
            elif url.path == "/":
                self._send(200, json.dumps({"endpoints": _ENDPOINTS}, indent=1).encode() + b"\n", "application/json")
            else:
                self._send(404, b'{"error": "no such page"}\n', "application/json")
        except queue.Empty:
            self._send(503, b'{"error": "the broker did not answer in time"}\n', "application/json")
        except Exception:
            log.exception("dashboard request %s failed", url.path)
            self._send(500, b'{"error": "internal error (see the broker\'s log)"}\n', "application/json")

    def _json(self, data: Any) -> None:
        self._send(200, json.dumps(data, default=str).encode() + b"\n", "application/json")

    def _authorized(self, query_token: str) -> bool:
        header = self.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else query_token
        return bool(given) and hmac.compare_digest(given.encode(), self.server.token.encode())

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path only: its query may hold the token.
        log.debug("dashboard %s %s %s", self.command, urllib.parse.urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard %s: %s", self.address_string(), format % args)
