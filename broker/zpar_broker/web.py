"""The broker's HTTP side (``--dashboard HOST:PORT``): the dashboard page, its live feed, the JSON API, the
controls and ``/metrics`` for Prometheus (``_ENDPOINTS``), to holders of its token only.

A thread of its own serves the port (``http.server``); it never touches the broker's state. Each request is
a question put to the broker's loop (``Questions``: a queue, and a socket pair the loop polls), answered
there with plain data and rendered here. So the loop pays only for what is asked, when it is asked.

The token: with CurveZMQ, derived from the broker's own secret key (``token_for``), so it survives
restarts; without keys, made at random at start. The broker logs the link with it, and ``zpar status``
shows it where every producer is trusted (a shared secret). It goes in an ``Authorization: Bearer``
header, or for reading in a ``?token=`` query (the link, as Jupyter does); controls take the header only.
Without it, 401 and no data; the page's own files (no data in them) load without it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.server
import importlib.resources
import json
import logging
import queue
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from zpar import protocol as P
from zpar import security
from zpar._loop import Waker

log = logging.getLogger(__name__)

#: Seconds a request waits for the broker's loop to answer (a loop that busy is itself news: 503).
ANSWER_TIMEOUT = 5.0

_ENDPOINTS = {
    "/": "the dashboard page (live: it reads /api/events)",
    "/api/events": "server-sent events: a snapshot of status, metrics and the latest tasks every second",
    "/api/status": "the broker's status as JSON: what `zpar status --json` prints",
    "/api/tasks": "the latest tasks that ended, newest first (?limit=N, at most 10,000; ?failed=1: only failures)",
    "POST /api/nodes/drain": '{"node": NAME}: the node takes no more tasks, finishes its own, and leaves',
    "POST /api/nodes/stop": '{"node": NAME}: the node leaves now; its tasks run elsewhere (an attempt each)',
    "POST /api/nodes/workers": '{"node": NAME, "workers": N}: the node keeps N workers from now on',
    "POST /api/tasks/cancel": '{"producer": LABEL, "task": ID}: cancel one task, or (no "task") all of them',
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
        self._waker = Waker()

    def fileno(self) -> int:
        return self._waker.fileno()

    def ask(self, what: Any, timeout: float = ANSWER_TIMEOUT) -> Any:
        """The loop's answer to ``what``; raises queue.Empty after ``timeout`` s, or what answering raised."""
        reply: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queue.put((what, reply))
        self._waker.wake()
        answer = reply.get(timeout=timeout)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def answer(self, respond: Callable[[Any], Any]) -> None:
        """The loop's part: answer every question waiting."""
        self._waker.drain()
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
        self._waker.close()


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
        self._httpd.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


#: The most bytes a control's JSON body may have.
MAX_BODY = 64 * 1024


def _control_question(path: str, body: Any) -> tuple[str, dict[str, Any]] | None:
    """The question to the broker's loop for a POST to ``path`` with JSON ``body``; None: no such control.
    Raises ValueError, TypeError or KeyError for a body that does not say what the control needs."""
    if not isinstance(body, dict):
        raise TypeError("the body must be a JSON object")
    if path in ("/api/nodes/drain", "/api/nodes/stop"):
        return "control", {"node": str(body["node"]), "action": path.rsplit("/", 1)[1]}
    if path == "/api/nodes/workers":
        workers = body["workers"]
        if type(workers) is not int or not 1 <= workers <= P.MAX_WORKERS:
            raise ValueError(f"workers must be a whole number from 1 to {P.MAX_WORKERS}")
        return "control", {"node": str(body["node"]), "action": "workers", "workers": workers}
    if path == "/api/tasks/cancel":
        task = body.get("task")
        if task is not None and (type(task) is not int or task < 0):
            raise ValueError("task must be a task id (or left out: all of that producer's tasks)")
        return "cancel", {"producer": str(body["producer"]), "task": task}
    return None


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
        self.lock = threading.Lock()
        self.watchers = 0  # open event streams
        self.stopping = threading.Event()  # the broker stops: event streams end
        self._latest = (float("-inf"), b"")  # (when, the event): the snapshot every page is sent
        self._latest_lock = threading.Lock()

    def snapshot_event(self) -> bytes:
        """The latest snapshot as an event: asked of the broker's loop at most once in EVENT_EVERY / 2 s, however
        many pages are open (each would otherwise make the loop build its own, every second)."""
        with self._latest_lock:
            taken, event = self._latest
            if time.monotonic() - taken < EVENT_EVERY / 2:
                return event
            try:
                snapshot = self.questions.ask(("snapshot", {}))
            except queue.Empty:
                return b'data: {"error": "the broker did not answer in time"}\n\n'
            event = b"data: " + json.dumps(snapshot, default=str).encode() + b"\n\n"
            self._latest = (time.monotonic(), event)
            return event


#: The dashboard's files (zpar_broker/static/), by path: written here, no third-party code, nothing from a CDN.
_PAGES = {"/": ("dashboard.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
#: The page loads only its own files and talks only to its own origin.
_CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
#: Seconds between two snapshots on an event stream, and the most streams open at once.
EVENT_EVERY = 1.0
MAX_WATCHERS = 32


@functools.cache
def _page(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "zpar-broker"
    sys_version = ""

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/favicon.ico":  # a browser asks for it by itself: nothing, rather than a 401 in its console
            self._send(204, b"", "image/x-icon")
            return
        if url.path in _PAGES:  # the page and its script hold no data: anyone may load them, not what they show
            name, kind = _PAGES[url.path]
            self._send(200, _page(name), kind, {"Content-Security-Policy": _CSP})
            return
        if not self._authorized(urllib.parse.parse_qs(url.query).get("token", [""])[0]):
            self._unauthorized("this needs the dashboard token: the link in the broker's log or in `zpar status`, "
                               "or an Authorization: Bearer header")
            return
        self._answering(url.path, lambda: self._get(url))

    def _get(self, url: urllib.parse.SplitResult) -> None:
        ask = self.server.questions.ask
        if url.path == "/api/status":
            self._json(ask(("status", {})))
        elif url.path == "/api/tasks":
            self._json(ask(("tasks", _task_query(urllib.parse.parse_qs(url.query)))))
        elif url.path == "/metrics":
            from .metrics import render  # prometheus-client is loaded only when asked for

            self._send(200, *render(ask(("metrics", {}))))
        elif url.path == "/api/events":
            self._events()
        elif url.path == "/api":
            self._json({"endpoints": _ENDPOINTS})
        else:
            self._error(404, "no such page")

    def do_POST(self) -> None:
        """The dashboard's controls. The token only in the Authorization header, never a query: another site's
        form cannot set a header, so it cannot act with a token it happened to learn from a link."""
        url = urllib.parse.urlsplit(self.path)
        if not self._authorized(""):
            self._unauthorized("controls need the token in an Authorization: Bearer header")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY:
                raise ValueError(f"a body of at most {MAX_BODY} bytes")
            body = json.loads(self.rfile.read(length) or b"{}")
            question = _control_question(url.path, body)
        except (ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
            self._error(400, f"bad request: {exc}")
            return
        if question is None:
            self._error(404, "no such control")
            return
        self._answering(url.path, lambda: self._json(self.server.questions.ask(question)))

    def _answering(self, path: str, respond: Callable[[], None]) -> None:
        """``respond()``, or the error to send when the loop did not answer (503) or answering failed (500)."""
        try:
            respond()
        except queue.Empty:
            self._error(503, "the broker did not answer in time")
        except Exception:
            log.exception("dashboard request %s failed", path)
            self._error(500, "internal error (see the broker's log)")

    def _events(self) -> None:
        """Server-sent events: a snapshot (status, metrics, the latest tasks) every EVENT_EVERY s, until the
        page goes away or the broker stops. At most MAX_WATCHERS at once (each holds a thread)."""
        server = self.server
        with server.lock:
            if server.watchers >= MAX_WATCHERS:
                self._error(503, "too many dashboards open at once")
                return
            server.watchers += 1
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            while not server.stopping.is_set():
                self.wfile.write(server.snapshot_event())
                self.wfile.flush()
                server.stopping.wait(EVENT_EVERY)
        except OSError:  # the page went away (BrokenPipeError, ConnectionResetError)
            pass
        finally:
            with server.lock:
                server.watchers -= 1

    def _json(self, data: Any, code: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(data, default=str).encode() + b"\n", "application/json", headers)

    def _error(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
        self._json({"error": text}, code, headers)

    def _unauthorized(self, text: str) -> None:
        self._error(401, text, {"WWW-Authenticate": 'Bearer realm="zpar"'})

    def _authorized(self, query_token: str) -> bool:
        """The token is right: from an Authorization Bearer header, else ``query_token`` ("": the header only)."""
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
