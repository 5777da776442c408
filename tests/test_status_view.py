"""What peers send reaches a terminal or a log line as inert text: ``printable`` and ``zpar status``."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from zpar._text import printable
from zpar.cli._status import render

HOSTILE = ["[/]", "[bold red]x", "\x1b[31mred", "a\nb", "cr\rover", "bell\a", "c1\x9bq", "bidi\u202eevil",
           "nul\0", "del\x7f", "[link=http://evil]click[/link]"]
# C0 controls, DEL and C1 controls: none may reach a terminal from a peer.
CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202e]")


# ---------------------------------------------------------------------- printable


@pytest.mark.parametrize(("raw", "shown"), [
    ("node-1", "node-1"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("a\nb\r\tc", "a\\nb\\r\\tc"),
    ("bell\a\0", "bell\\x07\\x00"),
    ("c1\x85\x9b", "c1\\x85\\x9b"),
    ("del\x7f", "del\\x7f"),
    ("rtl\u202eoverride\u2028", "rtl\\u202eoverride\\u2028"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("back\\slash", "back\\\\slash"),
    ("héllo 日本", "héllo 日本"),
])
def test_printable_shows_controls_as_visible_escapes(raw, shown):
    assert printable(raw) == shown


def test_printable_output_has_no_control_characters_at_all():
    every = "".join(chr(c) for c in range(0x200)) + "\u2028\u2029\u202a\u202e\u2066\ufeff"
    out = printable(every, limit=10_000)
    assert not CONTROLS.search(out)
    assert out.isprintable()


def test_printable_bytes_show_undecodable_bytes_as_escapes():
    assert printable(b"host\xff\n") == "host\\xff\\n"


def test_printable_non_strings_are_shown_as_text():
    assert printable(1234) == "1234"
    assert printable(None) == "None"


def test_printable_cuts_long_text_to_the_limit_with_a_marker():
    out = printable("x" * 10_000, limit=20)
    assert len(out) == 20 and out.endswith("...")
    assert printable("x" * 20, limit=20) == "x" * 20


def test_printable_never_cuts_inside_an_escape():
    out = printable("abcd\x1b\x1b\x1b\x1b", limit=10)
    assert out == "abcd..."  # "abcd\x1" would be a forged, half escape
    assert len(out) <= 10


def test_printable_bounds_its_work_on_huge_input():
    assert len(printable("\n" * 10_000_000, limit=50)) <= 50
    assert len(printable(b"\xff" * 10_000_000, limit=50)) <= 50


# ---------------------------------------------------------------------- zpar status


def _info(names: list[str], hosts: list[str] | None = None, **extra) -> dict:
    hosts = hosts or names
    nodes = [{"name": n, "host": h, "pid": 100 + i, "workers": 2, "busy": 1, "idle": 1, "running": 3,
              "credits": 0, "last_seen_s": 0.1} for i, (n, h) in enumerate(zip(names, hosts, strict=True))]
    info = {"epoch": "0123456789abcdef", "uptime_s": 12.4, "producers": 1, "nodes": nodes, "workers": 2 * len(nodes),
            "busy": len(nodes), "queued": 0, "running": 3, "done": 7, "failed": 0,
            "counters": {"protocol_errors": 2}, "security": "CurveZMQ, shared secret"}
    info.update(extra)
    return info


def _rendered(info: dict, **console) -> str:
    out = io.StringIO()
    render(info, "tcp://127.0.0.1:5555", Console(file=out, width=400, **console))
    return out.getvalue()


@pytest.mark.parametrize("name", HOSTILE)
def test_status_shows_a_hostile_node_name_as_plain_text(name):
    text = _rendered(_info([name], ["host-" + name]), force_terminal=False, no_color=True)
    assert printable(name) in text
    assert "host-" + printable(name) in text
    assert not CONTROLS.search(text.replace("\n", "").replace("\t", ""))


def test_status_on_a_colour_terminal_lets_no_peer_escape_through():
    names = HOSTILE
    text = _rendered(_info(names), force_terminal=True, color_system="truecolor")
    # Rich's own styling is ESC [ ... m; every other ESC would be the peer's.
    ours = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "\x1b" not in ours
    assert not CONTROLS.search(ours.replace("\n", ""))
    assert "\\x1b[31mred" in ours  # shown, visibly, not obeyed
    assert "[bold red]x" in ours and "[/]" in ours  # shown as typed, not read as markup
    assert "\x1b]8;" not in text  # no hyperlink from [link=...]


def test_status_markup_in_a_name_does_not_style_or_end_styles():
    plain = _rendered(_info(["node-1"]), force_terminal=True, color_system="truecolor")
    styled = _rendered(_info(["[bold red]x"]), force_terminal=True, color_system="truecolor")
    # The hostile name adds no style codes: the same number of SGR sequences as a plain name.
    assert len(re.findall(r"\x1b\[", styled)) == len(re.findall(r"\x1b\[", plain))


def test_status_from_a_hostile_broker_renders_without_raising():
    info = _info(["n"], producers="[/]", uptime_s="\x1b[2J", epoch=["not", "text"], workers={"x": 1},
                 security="INSECURE\n[/]", counters={"protocol_errors": "[/]\x07"})
    info["nodes"].append("not a node")
    text = _rendered(info, force_terminal=True, color_system="truecolor")
    ours = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "\x1b" not in ours and "\x07" not in ours
    assert "INSECURE\\n[/]" in ours


def test_status_with_missing_fields_renders_what_it_has():
    text = _rendered({"nodes": [{"name": "only-a-name"}]}, no_color=True)
    assert "only-a-name" in text
