"""The wire format: every message kind round-trips, and anything malformed is a ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zpar import protocol as P
from zpar.errors import ProtocolError

D = b"\x01" * 16  # a function digest

#: (message, how many payload frames travel with it)
SAMPLES = [
    (P.Hello(P.Role.AGENT, "node-1", "host", 1234, 4), 0),
    (P.Hello(P.Role.PRODUCER), 0),
    (P.Welcome("e" * 32, 0.1, 3, "tcp://127.0.0.1:5557", 1 << 30), 0),
    (P.Submit((P.TaskEntry(1, D, 1), P.TaskEntry(2, D, 0, P.FLAG_CHUNK, b"inline"), P.TaskEntry(3, D, 3)), (D,)), 5),
    (P.Tasks((P.TaskEntry(7, D, 0, 0, b"x"),)), 0),
    (P.Ready(250), 0),
    (P.Heartbeat(2), 0),
    (P.Result((P.ResultEntry(1, P.Status.OK, 2, 15), P.ResultEntry(2, P.Status.LOST, 0, 0, b"killed")), b"agent-id"), 2),
    (P.Result((P.ResultEntry(9, P.Status.RAISED, 0, 3, b"exc"),)), 0),
    (P.Cancel((1, 2, 3)), 0),
    (P.StatusMsg(), 0),
    (P.StatusMsg({"nodes": [{"name": "a", "busy": 1}], "queued": 3, "ratio": 0.5}), 0),
    (P.Bye("agent stopping"), 0),
    (P.Error("tasks refused", (4, 5)), 0),
    (P.Submit((P.TaskEntry(4, D, 0, 0, b"x", 3, 1500),)), 0),
    (P.Result((P.ResultEntry(5, P.Status.TIMEOUT, 0, 0, b"too slow"),), b"agent-id", "epoch-1"), 0),
    (P.Cancel((6,), force=True), 0),
    (P.Bye("leaving", b"agent-id"), 0),
    (P.Ack((1, 2, 3)), 0),
    (P.Items((P.ItemEntry(1, 0, 0, b"x"), P.ItemEntry(1, 1, 2)), (P.Credit(4, 300),), b"agent-id", "epoch-1"), 2),
    (P.Items((), (P.Credit(4, 300),)), 0),
    (P.Feed((P.ItemEntry(2, 5, 1),), (P.Credit(2, 256),), (2, 3)), 1),
    (P.Feed(closed=(9,)), 0),
]


def header(**fields) -> bytes:
    return msgpack.packb({"v": P.VERSION, **fields}, use_bin_type=True)


@pytest.mark.parametrize("msg,nframes", SAMPLES, ids=lambda v: type(v).__name__ if not isinstance(v, int) else "")
def test_every_message_kind_round_trips(msg, nframes):
    assert P.decode(P.encode(msg), nframes) == msg
    assert P.decode(memoryview(P.encode(msg)), nframes) == msg


def test_every_kind_has_a_round_trip_sample():
    assert {m.kind for m, _ in SAMPLES} == set(P.Kind)


@pytest.mark.parametrize("msg,nframes", SAMPLES, ids=lambda v: type(v).__name__ if not isinstance(v, int) else "")
def test_wrong_frame_count_is_refused(msg, nframes):
    for wrong in (nframes - 1, nframes + 1):
        if wrong >= 0:
            with pytest.raises(ProtocolError, match="frames"):
                P.decode(P.encode(msg), wrong)


def test_payload_up_to_inline_max_rides_in_the_header():
    assert P.pack_payload([b"x" * P.INLINE_MAX]) == (0, b"x" * P.INLINE_MAX, ())
    big = [b"x" * (P.INLINE_MAX + 1)]
    assert P.pack_payload(big) == (1, b"", big)
    two = [b"a", b"b"]
    assert P.pack_payload(two) == (2, b"", two)
    entry = P.TaskEntry(1, D, 0, 0, b"inline")
    assert P.unpack_payload(entry, [b"other"], 0) == ((b"inline",), 0)
    assert P.unpack_payload(P.TaskEntry(1, D, 2), [b"a", b"b", b"c"], 1) == ([b"b", b"c"], 3)


REJECTED = {
    "wrong version": header(v=2, k=int(P.Kind.HEARTBEAT)),
    "version as text": msgpack.packb({"v": "1", "k": 6}),
    "version as bool": msgpack.packb({"v": True, "k": 6}),
    "no version": msgpack.packb({"k": 6}),
    "unknown kind": header(k=99),
    "kind as text": header(k="HELLO"),
    "no kind": header(),
    "hello without role": header(k=int(P.Kind.HELLO)),
    "hello with unknown role": header(k=int(P.Kind.HELLO), role="king"),
    "hello with text pid": header(k=int(P.Kind.HELLO), role="agent", pid="12"),
    "hello with negative workers": header(k=int(P.Kind.HELLO), role="agent", workers=-1),
    "welcome without epoch": header(k=int(P.Kind.WELCOME), heartbeat=1.0, liveness=3),
    "welcome with text heartbeat": header(k=int(P.Kind.WELCOME), epoch="e", heartbeat="1", liveness=3),
    "ready without credits": header(k=int(P.Kind.READY)),
    "ready with negative credits": header(k=int(P.Kind.READY), n=-1),
    "ready with bool credits": header(k=int(P.Kind.READY), n=True),
    "ready with float credits": header(k=int(P.Kind.READY), n=2.0),
    "submit without tasks": header(k=int(P.Kind.SUBMIT)),
    "submit with a short task entry": header(k=int(P.Kind.SUBMIT), t=[[1, D, 1, 0]], f=[]),
    "submit with a text digest": header(k=int(P.Kind.SUBMIT), t=[[1, "d", 0, 0, b"x"]], f=[]),
    "submit with a negative id": header(k=int(P.Kind.SUBMIT), t=[[-1, D, 0, 0, b"x"]], f=[]),
    "submit with no payload at all": header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b""]], f=[]),
    "submit with a text function digest": header(k=int(P.Kind.SUBMIT), t=[], f=["d"]),
    "submit with tasks as a map": header(k=int(P.Kind.SUBMIT), t={"1": 1}),
    "result without results": header(k=int(P.Kind.RESULT)),
    "result with unknown status": header(k=int(P.Kind.RESULT), r=[[1, 7, 0, 0, b"x"]]),
    "result with text duration": header(k=int(P.Kind.RESULT), r=[[1, 0, 0, "1", b"x"]]),
    "result with text agent": header(k=int(P.Kind.RESULT), r=[], a="agent"),
    "cancel without ids": header(k=int(P.Kind.CANCEL)),
    "cancel with text ids": header(k=int(P.Kind.CANCEL), ids=["a"]),
    "status with a list": header(k=int(P.Kind.STATUS), info=[1]),
    "bye with a number": header(k=int(P.Kind.BYE), reason=5),
    "error without message": header(k=int(P.Kind.ERROR), ids=[]),
    "truncated msgpack": P.encode(P.Hello(P.Role.AGENT, "name"))[:-3],
    "empty frame": b"",
    "msgpack reserved byte": b"\xc1",
    "trailing bytes": P.encode(P.Heartbeat()) + b"\x00",
    "header is a list": msgpack.packb([1, 6]),
    "header is an int": msgpack.packb(1),
    "header is bytes": msgpack.packb(b"\x81\xa1v\x01"),
    "map with int keys": msgpack.packb({1: 1, "v": 1, "k": 6}),
    "huge declared array": b"\xdd\xff\xff\xff\xff",
    "items without items": header(k=int(P.Kind.ITEMS)),
    "items with a short entry": header(k=int(P.Kind.ITEMS), i=[[1, 0, 0]]),
    "items with a negative seq": header(k=int(P.Kind.ITEMS), i=[[1, -1, 0, b"x"]]),
    "items with no payload at all": header(k=int(P.Kind.ITEMS), i=[[1, 0, 0, b""]]),
    "items with a text credit": header(k=int(P.Kind.ITEMS), i=[], c=[[1, "2"]]),
    "items with a short credit": header(k=int(P.Kind.ITEMS), i=[], c=[[1]]),
    "feed with closed as a map": header(k=int(P.Kind.FEED), i=[], closed={"1": 1}),
    "feed with a negative closed id": header(k=int(P.Kind.FEED), i=[], closed=[-1]),
    "feed with a bool seq": header(k=int(P.Kind.FEED), i=[[1, True, 0, b"x"]]),
}


@pytest.mark.parametrize("frame", REJECTED.values(), ids=REJECTED.keys())
def test_malformed_header_is_refused(frame):
    with pytest.raises(ProtocolError):
        P.decode(frame, 0)


def test_result_entry_with_a_list_as_status_is_refused():
    with pytest.raises(ProtocolError):
        P.decode(header(k=int(P.Kind.RESULT), r=[[1, [0], 0, 0, b"x"]]), 0)


def test_oversize_header_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="limit"):
        P.decode(b"\x90" * (P.MAX_HEADER_BYTES + 1), 0)


def test_too_many_frames_are_refused():
    with pytest.raises(ProtocolError, match="limit"):
        P.decode(P.encode(P.Heartbeat()), P.MAX_FRAMES + 1)


# ---------------------------------------------------------------------- properties

ids_ = st.integers(0, 2**63 - 1)
small = st.integers(0, 2**32)
texts = st.text(max_size=12)
payload = st.tuples(st.integers(0, 3), st.binary(max_size=8)).filter(lambda p: p[0] or p[1])
task_entries = st.builds(lambda i, d, p, f: P.TaskEntry(i, d, p[0], f, p[1]),
                         ids_, st.binary(min_size=1, max_size=16), payload, st.integers(0, 3))
result_entries = st.builds(lambda i, s, p, us: P.ResultEntry(i, s, p[0], us, p[1]),
                           ids_, st.sampled_from(list(P.Status)), payload, small)
item_entries = st.builds(lambda i, seq, p: P.ItemEntry(i, seq, p[0], p[1]), ids_, ids_, payload)
credits = st.lists(st.builds(P.Credit, ids_, ids_), max_size=3).map(tuple)
json_like = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | texts
                         | st.floats(allow_nan=False),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                         max_leaves=8)
messages = st.one_of(
    st.builds(P.Hello, st.sampled_from(list(P.Role)), texts, texts, small, small),
    st.builds(P.Welcome, texts, st.floats(0, 1e6), small, texts, small),
    st.builds(P.Submit, st.lists(task_entries, max_size=4).map(tuple), st.lists(st.binary(max_size=4), max_size=2).map(tuple)),
    st.builds(P.Tasks, st.lists(task_entries, max_size=4).map(tuple), st.lists(st.binary(max_size=4), max_size=2).map(tuple)),
    st.builds(P.Ready, small),
    st.builds(P.Heartbeat, small),
    st.builds(P.Result, st.lists(result_entries, max_size=4).map(tuple), st.binary(max_size=8)),
    st.builds(P.Cancel, st.lists(ids_, max_size=4).map(tuple)),
    st.builds(P.StatusMsg, st.dictionaries(texts, json_like, max_size=4)),
    st.builds(P.Bye, texts),
    st.builds(P.Error, texts, st.lists(ids_, max_size=3).map(tuple)),
    st.builds(P.Items, st.lists(item_entries, max_size=4).map(tuple), credits, st.binary(max_size=8), texts),
    st.builds(P.Feed, st.lists(item_entries, max_size=4).map(tuple), credits, st.lists(ids_, max_size=3).map(tuple)),
)


def frames_of(msg) -> int:
    if isinstance(msg, (P.Submit, P.Tasks)):
        return len(msg.funcs) + sum(t.nframes for t in msg.tasks)
    if isinstance(msg, P.Result):
        return sum(r.nframes for r in msg.results)
    if isinstance(msg, (P.Items, P.Feed)):
        return sum(i.nframes for i in msg.items)
    return 0


@given(messages)
def test_any_valid_message_round_trips(msg):
    assert P.decode(P.encode(msg), frames_of(msg)) == msg


def decode_or_protocol_error(frame, nframes):
    try:
        P.decode(frame, nframes)
    except ProtocolError:
        pass  # anything else propagates and fails the test


@given(st.binary(max_size=256), st.integers(0, 8))
def test_random_bytes_give_a_message_or_protocol_error(frame, nframes):
    decode_or_protocol_error(frame, nframes)


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | texts | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=4), max_leaves=12)


@given(messages, st.data())
def test_mutated_valid_headers_give_a_message_or_protocol_error(msg, data):
    h = msgpack.unpackb(P.encode(msg))
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["drop", "set", "nested"]))
        key = data.draw(st.sampled_from(sorted(h) + ["extra"]))
        if action == "drop":
            h.pop(key, None)
        elif action == "set":
            h[key] = data.draw(anything)
        elif isinstance(h.get(key), list) and h[key]:  # damage one entry of a list field
            i = data.draw(st.integers(0, len(h[key]) - 1))
            row = h[key][i]
            if isinstance(row, list) and row:
                row[data.draw(st.integers(0, len(row) - 1))] = data.draw(anything)
            else:
                h[key][i] = data.draw(anything)
    nframes = data.draw(st.sampled_from([frames_of(msg), 0, 1, 3]))
    decode_or_protocol_error(msgpack.packb(h, use_bin_type=True), nframes)


@given(messages, st.data())
def test_byte_level_damage_gives_a_message_or_protocol_error(msg, data):
    frame = bytearray(P.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            frame[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del frame[i:]
            if not frame:
                break
        else:
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    decode_or_protocol_error(bytes(frame), frames_of(msg))


def test_a_header_with_too_many_entries_is_refused_before_they_are_read():
    rows = [[i, D, 1, 0, b"", 0, 0] for i in range(P.MAX_ENTRIES + 1)]
    with pytest.raises(ProtocolError, match="over the"):
        P.decode(msgpack.packb({"v": P.VERSION, "k": int(P.Kind.SUBMIT), "t": rows, "f": []}), 0)
