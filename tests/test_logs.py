"""``--log-format json``: one JSON object a line, with the task, node and producer a line is about."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys

import pytest

from zpar._logs import JsonFormatter
from zpar.testing import wait_for

pytestmark = pytest.mark.timeout(60)

BIN = os.path.dirname(sys.executable)


def test_a_json_line_carries_the_message_its_context_and_the_traceback():
    logger = logging.getLogger("zpar.test")
    record = logger.makeRecord("zpar.test", logging.WARNING, __file__, 1, "task %d lost on %s", (7, "node-1"), None,
                               extra={"task": 7, "node": "node-1", "producer": "client-42", "pid": 99})
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "task 7 lost on node-1" and line["level"] == "WARNING" and line["logger"] == "zpar.test"
    assert (line["task"], line["node"], line["producer"], line["pid"]) == (7, "node-1", "client-42", 99)
    assert line["time"].endswith("+00:00")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logger.makeRecord("zpar.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(JsonFormatter().format(record))  # one line, whatever the traceback holds
    assert "ValueError: boom" in line["exception"] and "task" not in line


def test_the_daemons_write_one_json_object_a_line():
    broker = subprocess.Popen([os.path.join(BIN, "zpar-broker"), "--log-format", "json", "--dashboard", "off",
                               *(f"--{name}=tcp://127.0.0.1:0" for name in ("frontend", "backend", "collector"))],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = b""
    try:
        def listening() -> bool:
            nonlocal out
            while select.select([broker.stderr], [], [], 0)[0]:
                chunk = os.read(broker.stderr.fileno(), 65536)
                if not chunk:
                    return True
                out += chunk
            return b"listening" in out
        wait_for(listening, 20, 0.02, "the broker's first log line")
        broker.send_signal(signal.SIGTERM)
        _, rest = broker.communicate(timeout=20)
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.communicate()
    lines = [json.loads(line) for line in (out + rest).decode().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any("listening" in line["message"] for line in lines)


def test_an_unknown_log_format_is_refused_with_a_clear_error():
    done = subprocess.run([os.path.join(BIN, "zpar-agent"), "--log-format", "xml"], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "log-format must be text or json" in done.stderr
