"""The daemons' log lines: text for people, or one JSON object a line (``--log-format json``) for machines.

A log call names what it is about in ``extra`` (``CONTEXT``: the task, the
node, the producer, the worker's pid); the JSON line carries those as fields
of their own, so a log pipeline can select one task's or one node's lines
without parsing English.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

#: The ``extra`` fields a JSON line carries when a log call gives them.
CONTEXT = ("task", "node", "producer", "pid")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the context fields given, and the
    traceback of an exception as text."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value if isinstance(value, int | float | str | bool) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text or JSON lines (``fmt``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
