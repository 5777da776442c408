"""Text a peer sent, made safe to show: one line, no terminal controls, bounded.

Names, hosts and details arrive from agents, producers and brokers. Written
as they are, a newline forges a log line, an ESC sequence drives the
terminal of whoever reads the log or ``zpar status``, and a bidi override
makes a name read as another. ``printable`` shows each such character as a
visible escape (``\\x1b``, ``\\n``, ``\\u202e``) instead, and cuts the text to a
length a log line can carry.
"""

from __future__ import annotations

#: Characters shown by their usual short escape.
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}

ELLIPSIS = "..."


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    if ch.isprintable():  # not a control, format, separator, surrogate, private or unassigned character
        return ch
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape: show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: object, limit: int = 200) -> str:
    """``text`` as one line a log or a terminal can show as it is.

    Every character ``str.isprintable`` refuses (C0 and C1 controls, DEL,
    bidi overrides, zero-width and format characters, line separators,
    spaces other than " ", unassigned code points) is shown as an escape, a
    backslash is doubled so those escapes cannot be forged, and the result
    (always ``isprintable()``) is at most
    ``limit`` characters, ending in ``...`` when cut (never inside an escape).
    Bytes are decoded as UTF-8, an undecodable byte shown as ``\\xNN``;
    anything else is ``str()``-ed.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text[: (limit + 1) * 4]).decode("utf-8", "surrogateescape")  # at most 4 bytes a character
    elif not isinstance(text, str):
        text = str(text)
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text  # the common case, checked in C
    pieces: list[str] = []
    size = 0
    for ch in text[: limit + 1]:  # what is past the limit cannot show: never walk a huge string
        pieces.append(_escape(ch))
        size += len(pieces[-1])
        if size > limit:
            break
    if size <= limit:
        return "".join(pieces)
    keep, size = max(0, limit - len(ELLIPSIS)), 0
    out: list[str] = []
    for piece in pieces:  # whole escapes only: a cut ``\\x1`` would read as something it is not
        if size + len(piece) > keep:
            break
        out.append(piece)
        size += len(piece)
    return ("".join(out) + ELLIPSIS)[:limit]
