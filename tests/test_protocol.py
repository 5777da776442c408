"""The wire format: every message kind round-trips with its payloads, and anything malformed is a ProtocolError."""

from __future__ import annotations

import dataclasses
import signal

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from zpar import protocol as P
from zpar.errors import ProtocolError

D = b"\x01" * 16  # a function digest
BLOB = b"function blob"
BIG = b"b" * (P.INLINE_MAX + 1)  # one frame too large to ride inline
KILLED = P.Cause("node-1", 4321, None, 9, 0, "")


def as_bytes(frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def payload_of(payload) -> tuple[bytes, ...]:
    return tuple(as_bytes(f) for f in payload)


def norm(msg):
    """``msg`` with every payload and function blob as a tuple of bytes, to compare what was sent and what came."""
    if isinstance(msg, (P.Submit, P.Tasks)):
        return dataclasses.replace(msg, tasks=tuple(t._replace(payload=payload_of(t.payload)) for t in msg.tasks),
                                   funcs=tuple(P.Function(f.digest, as_bytes(f.blob)) for f in msg.funcs))
    if isinstance(msg, P.Result):
        return dataclasses.replace(msg, results=tuple(r._replace(payload=payload_of(r.payload)) for r in msg.results))
    if isinstance(msg, (P.Items, P.Feed)):
        return dataclasses.replace(msg, items=tuple(i._replace(payload=payload_of(i.payload)) for i in msg.items))
    if isinstance(msg, P.Part):
        return dataclasses.replace(msg, payload=payload_of(msg.payload))
    return msg


def round_trip(msg):
    return P.decode(P.encode(msg))


#: (message, how many payload frames travel beside its header)
SAMPLES = [
    (P.Hello(P.Role.AGENT, "node-1", "host", 1234, 4), 0),
    (P.Hello(P.Role.PRODUCER), 0),
    (P.Welcome("e" * 32, 0.1, 3, "tcp://127.0.0.1:5557", 1 << 30), 0),
    (P.Submit((P.TaskEntry(1, D, (BIG,)), P.TaskEntry(2, D, (b"inline",), P.FLAG_CHANNEL),
               P.TaskEntry(3, D, (b"args", b"buf1", b"buf2"))), (P.Function(D, BLOB),)), 5),
    (P.Tasks((P.TaskEntry(7, D, (b"x",)),)), 0),
    (P.Tasks((P.TaskEntry(7, D, (b"args", b"buffer"), P.FLAG_CHANNEL, 2, 1500),), (P.Function(D, BLOB),)), 3),
    (P.Ready(250), 0),
    (P.Heartbeat(2), 0),
    (P.Result((P.ResultEntry(1, P.Status.OK, (b"value", b"buffer"), 15), P.ResultEntry(2, P.Status.LOST, cause=KILLED)),
              b"agent-id"), 2),
    (P.Result((P.ResultEntry(9, P.Status.RAISED, (b"exc",), 3),)), 0),
    (P.Result((P.ResultEntry(9, P.Status.STREAMED, (BIG,), 3),)), 1),
    (P.Cancel((1, 2, 3)), 0),
    (P.StatusMsg(), 0),
    (P.StatusMsg({"nodes": [{"name": "a", "busy": 1}], "queued": 3, "ratio": 0.5}), 0),
    (P.Bye(), 0),
    (P.Bye(P.ByeReason.STOPPING), 0),
    (P.Error(P.ErrorCode.UNKNOWN_FUNCTION, (4, 5)), 0),
    (P.Error(P.ErrorCode.NOT_ALLOWED, (), "READY"), 0),
    (P.Submit((P.TaskEntry(4, D, (b"x",), 0, 3, 1500),)), 0),
    (P.Result((P.ResultEntry(5, P.Status.TIMEOUT, cause=P.Cause("n", 7, detail="ran past its timeout of 1 s")),
               P.ResultEntry(6, P.Status.CANCELLED, cause=P.Cause("n", 7, detail="cancelled")),
               P.ResultEntry(8, P.Status.MEMORY, cause=P.Cause("n", 7, None, 9, 0, "over 1 GiB")),
               P.ResultEntry(10, P.Status.LOST, cause=P.Cause("n", 7, 3, None, 4, "")),
               P.ResultEntry(11, P.Status.DEP_FAILED, cause=P.Cause("the broker", detail="task 10 failed"))),
              b"agent-id", "epoch-1"), 0),
    (P.Cancel((6,), force=True), 0),
    (P.Bye(P.ByeReason.LEAVING, b"agent-id"), 0),
    (P.Bye(P.ByeReason.RECYCLED), 0),
    (P.Ack((1, 2, 3)), 0),
    (P.GiveBack((4, 5)), 0),
    (P.Items((P.ItemEntry(1, 0, (b"x",)), P.ItemEntry(1, 1, (b"obj", b"buf"))), (P.Credit(4, 300),), b"agent-id",
             "epoch-1"), 2),
    (P.Items((), (P.Credit(4, 300),)), 0),
    (P.Feed((P.ItemEntry(2, 5, (BIG,)),), (P.Credit(2, 256),), (2, 3)), 1),
    (P.Feed(closed=(9,)), 0),
    (P.Submit((P.TaskEntry(5, D, (b"x",), refs=(P.digest(b"o1"), P.digest(b"o2"))),),
              (P.Function(P.digest(b"o1"), b"o1"),)), 1),
    (P.Release((P.digest(b"o1"), P.digest(b"o2"))), 0),
    (P.Submit((P.TaskEntry(6, D, (b"head",), parts=3, part_bytes=30),
               P.TaskEntry(7, D, (b"head",), refs=(P.digest(b"o1"),), parts=1, part_bytes=5))), 0),
    (P.Tasks((P.TaskEntry(8, D, (BIG,), 0, 2, 0, (), 2, 1 << 20),)), 1),
    (P.Part(6, 0, (b"part", b"two frames")), 2),
    (P.Control(P.Action.DRAIN), 0),
    (P.Heartbeat(1, P.NodeStats(37.5, 3 << 30, 8 << 30, (P.WorkerStats(4321, 60 << 20, 99.5),))), 0),
    (P.Control(P.Action.WORKERS, 8), 0),
]
SAMPLE_IDS = [f"{i}-{type(m).__name__}" for i, (m, _) in enumerate(SAMPLES)]


@pytest.mark.parametrize("msg,nframes", SAMPLES, ids=SAMPLE_IDS)
def test_every_message_kind_round_trips(msg, nframes):
    frames = P.encode(msg)
    assert len(frames) == 1 + nframes
    assert norm(P.decode(frames)) == norm(msg)
    zframes = [zmq.Frame(as_bytes(f)) for f in frames]  # as a socket gives them
    assert norm(P.decode(zframes)) == norm(msg)
    assert norm(P.decode([memoryview(as_bytes(f)) for f in frames])) == norm(msg)


@pytest.mark.parametrize("msg,nframes", SAMPLES, ids=SAMPLE_IDS)
def test_routed_messages_round_trip(msg, nframes):
    frames = P.encode_routed(b"peer-id", msg)
    assert frames[0] == b"peer-id" and len(frames) == 2 + nframes
    peer, got = P.decode_routed(frames)
    assert peer == b"peer-id" and norm(got) == norm(msg)
    peer, got = P.decode_routed([zmq.Frame(as_bytes(f)) for f in frames])
    assert peer == b"peer-id" and type(peer) is bytes and norm(got) == norm(msg)


def test_decode_starts_where_it_is_told():
    msg = SAMPLES[3][0]
    frames = [b"routing", b"more routing", *P.encode(msg)]
    assert norm(P.decode(frames, 2)) == norm(msg)


def test_every_kind_has_a_round_trip_sample():
    assert {m.kind for m, _ in SAMPLES} == set(P.Kind)


def test_every_status_error_code_and_bye_reason_round_trips():
    statuses = {r.status for m, _ in SAMPLES if isinstance(m, P.Result) for r in m.results}
    assert statuses == set(P.Status)
    for code in P.ErrorCode:
        assert round_trip(P.Error(code, (1,), "why")) == P.Error(code, (1,), "why")
    for reason in P.ByeReason:
        assert round_trip(P.Bye(reason, b"a")) == P.Bye(reason, b"a")


@pytest.mark.parametrize("msg,nframes", SAMPLES, ids=SAMPLE_IDS)
def test_wrong_frame_count_is_refused(msg, nframes):
    frames = P.encode(msg)
    with pytest.raises(ProtocolError, match="frames"):
        P.decode([*frames, b"an undeclared frame"])
    if nframes:
        with pytest.raises(ProtocolError, match="frames"):
            P.decode(frames[:-1])


def test_a_small_single_frame_payload_rides_in_the_header():
    for payload in ([b"x"], [b"x" * P.INLINE_MAX], [bytearray(b"ba")], [memoryview(b"mv")], [zmq.Frame(b"zf")]):
        frames = P.encode(P.Tasks((P.TaskEntry(1, D, payload),)))
        assert len(frames) == 1
        (task,) = P.decode(frames).tasks
        assert task.payload == (as_bytes(payload[0]),) and type(task.payload[0]) is bytes


def test_a_large_or_many_frame_payload_travels_in_frames_untouched():
    big = zmq.Frame(BIG)
    frames = P.encode(P.Submit((P.TaskEntry(1, D, [big]), P.TaskEntry(2, D, [b"a", b"b"])), (P.Function(D, BLOB),)))
    assert frames[1:] == [BLOB, big, b"a", b"b"] and frames[2] is big  # no copy on the way out
    msg = P.decode(frames)
    assert msg.funcs == (P.Function(D, BLOB),)
    assert msg.tasks[0].payload[0] is big and list(msg.tasks[1].payload) == [b"a", b"b"]  # nor on the way in


def test_a_value_result_without_a_payload_and_a_cause_without_one_encode_as_the_wire_says():
    (frame,) = P.encode(P.Result((P.ResultEntry(1, P.Status.LOST, cause=KILLED),)))
    (row,) = msgpack.unpackb(frame)["r"]
    assert row == [1, int(P.Status.LOST), 0, 0, b"", list(KILLED)]
    (frame,) = P.encode(P.Result((P.ResultEntry(2, P.Status.OK, (b"v",), 5),)))
    assert msgpack.unpackb(frame)["r"] == [[2, 0, 0, 5, b"v", None]]


def test_causes_say_how_the_worker_ended():
    killed = P.Cause.from_returncode("n", 12, -signal.SIGKILL)
    assert (killed.node, killed.pid, killed.exitcode, killed.signal) == ("n", 12, None, 9)
    assert killed.ended() == "killed by SIGKILL"
    exited = P.Cause.from_returncode("n", 12, 3, detail="why")
    assert (exited.exitcode, exited.signal, exited.detail) == (3, None, "why")
    assert exited.ended() == "exited with code 3"
    assert P.Cause.from_returncode("n", 1, 0).ended() == "exited with code 0"
    assert P.Cause(signal=200).ended() == "killed by signal 200"
    assert P.Cause().ended() == ""


def header(**fields) -> bytes:
    return msgpack.packb({"v": P.VERSION, **fields}, use_bin_type=True)


CAUSE = ["node", 1, None, 9, 0, ""]
TASKS, RESULT, ITEMS, FEED = (int(P.Kind.SUBMIT), int(P.Kind.RESULT), int(P.Kind.ITEMS), int(P.Kind.FEED))

#: name -> the frames of a message that must be refused
REJECTED = {
    "wrong version": [header(v=1, k=int(P.Kind.HEARTBEAT))],
    "a later version": [header(v=P.VERSION + 1, k=int(P.Kind.HEARTBEAT))],
    "version as text": [msgpack.packb({"v": str(P.VERSION), "k": 6})],
    "version as bool": [msgpack.packb({"v": True, "k": 6})],
    "no version": [msgpack.packb({"k": 6})],
    "unknown kind": [header(k=99)],
    "negative kind": [header(k=-1)],
    "kind as text": [header(k="HELLO")],
    "no kind": [header()],
    "hello without role": [header(k=int(P.Kind.HELLO))],
    "hello with unknown role": [header(k=int(P.Kind.HELLO), role="king")],
    "hello with text pid": [header(k=int(P.Kind.HELLO), role="agent", pid="12")],
    "hello with negative workers": [header(k=int(P.Kind.HELLO), role="agent", workers=-1)],
    "welcome without epoch": [header(k=int(P.Kind.WELCOME), heartbeat=1.0, liveness=3)],
    "welcome with text heartbeat": [header(k=int(P.Kind.WELCOME), epoch="e", heartbeat="1", liveness=3)],
    "ready without credits": [header(k=int(P.Kind.READY))],
    "ready with negative credits": [header(k=int(P.Kind.READY), n=-1)],
    "ready with bool credits": [header(k=int(P.Kind.READY), n=True)],
    "ready with float credits": [header(k=int(P.Kind.READY), n=2.0)],
    "submit without tasks": [header(k=TASKS)],
    "submit with a short task entry": [header(k=TASKS, t=[[1, D, 1, 0]], f=[]), b"args"],
    "submit with a task entry of the old shape": [header(k=TASKS, t=[[1, D, 0, 0, b"x"]], f=[])],
    "submit with a text digest": [header(k=TASKS, t=[[1, "d", 0, 0, b"x", 0, 0]], f=[])],
    "submit with a negative id": [header(k=TASKS, t=[[-1, D, 0, 0, b"x", 0, 0]], f=[])],
    "submit with negative flags": [header(k=TASKS, t=[[1, D, 0, -1, b"x", 0, 0]], f=[])],
    "submit with text data": [header(k=TASKS, t=[[1, D, 0, 0, "x", 0, 0]], f=[])],
    "submit with too many retries": [header(k=TASKS, t=[[1, D, 0, 0, b"x", P.MAX_RETRIES + 1, 0]], f=[])],
    "submit with a negative timeout": [header(k=TASKS, t=[[1, D, 0, 0, b"x", 0, -1]], f=[])],
    "submit with no payload at all": [header(k=TASKS, t=[[1, D, 0, 0, b"", 0, 0]], f=[])],
    "submit with inline data and frames": [header(k=TASKS, t=[[1, D, 1, 0, b"x", 0, 0]], f=[]), b"args"],
    "submit with a text function digest": [header(k=TASKS, t=[], f=["d"]), BLOB],
    "submit without its function blob": [header(k=TASKS, t=[[1, D, 0, 0, b"x", 0, 0]], f=[D])],
    "submit with tasks as a map": [header(k=TASKS, t={"1": 1})],
    "submit with a task as a map": [header(k=TASKS, t=[{"id": 1}], f=[])],
    "result without results": [header(k=RESULT)],
    "result with a list as status": [header(k=RESULT, r=[[1, [0], 0, 0, b"x", None]])],
    "result with unknown status": [header(k=RESULT, r=[[1, 99, 0, 0, b"x", None]])],
    "result with negative status": [header(k=RESULT, r=[[1, -1, 0, 0, b"x", None]])],
    "result with text duration": [header(k=RESULT, r=[[1, 0, 0, "1", b"x", None]])],
    "result with text agent": [header(k=RESULT, r=[], a="agent")],
    "result with bytes epoch": [header(k=RESULT, r=[], e=b"epoch")],
    "result entry of the old shape": [header(k=RESULT, r=[[1, 0, 0, 0, b"x"]])],
    "an OK result without a value": [header(k=RESULT, r=[[1, 0, 0, 0, b"", None]])],
    "an OK result with a cause": [header(k=RESULT, r=[[1, 0, 0, 0, b"x", CAUSE]])],
    "a RAISED result with a cause and frames": [header(k=RESULT, r=[[1, 1, 1, 0, b"", CAUSE]]), b"exc"],
    "a STREAMED result with a cause": [header(k=RESULT, r=[[1, 6, 0, 0, b"x", CAUSE]])],
    "a LOST result with a value": [header(k=RESULT, r=[[1, 2, 0, 0, b"killed", CAUSE]])],
    "a TIMEOUT result with value frames": [header(k=RESULT, r=[[1, 3, 1, 0, b"", CAUSE]]), b"x"],
    "a LOST result without a cause": [header(k=RESULT, r=[[1, 2, 0, 0, b"", None]])],
    "a CANCELLED result with text as cause": [header(k=RESULT, r=[[1, 4, 0, 0, b"", "cancelled"]])],
    "a cause of the wrong length": [header(k=RESULT, r=[[1, 2, 0, 0, b"", CAUSE[:5]]])],
    "a cause with bytes node": [header(k=RESULT, r=[[1, 2, 0, 0, b"", [b"n", 1, None, 9, 0, ""]]])],
    "a cause with a negative pid": [header(k=RESULT, r=[[1, 2, 0, 0, b"", ["n", -1, None, 9, 0, ""]]])],
    "a cause with text exit code": [header(k=RESULT, r=[[1, 2, 0, 0, b"", ["n", 1, "3", None, 0, ""]]])],
    "a cause with signal 0": [header(k=RESULT, r=[[1, 2, 0, 0, b"", ["n", 1, None, 0, 0, ""]]])],
    "a cause with a negative signal": [header(k=RESULT, r=[[1, 2, 0, 0, b"", ["n", 1, None, -9, 0, ""]]])],
    "a cause with negative attempts": [header(k=RESULT, r=[[1, 2, 0, 0, b"", ["n", 1, None, 9, -1, ""]]])],
    "a cause with bytes detail": [header(k=RESULT, r=[[1, 2, 0, 0, b"", ["n", 1, None, 9, 0, b"d"]]])],
    "cancel without ids": [header(k=int(P.Kind.CANCEL))],
    "cancel with text ids": [header(k=int(P.Kind.CANCEL), ids=["a"])],
    "cancel with text force": [header(k=int(P.Kind.CANCEL), ids=[1], force="yes")],
    "ack with negative ids": [header(k=int(P.Kind.ACK), ids=[-1])],
    "status with a list": [header(k=int(P.Kind.STATUS), info=[1])],
    "bye with an unknown reason": [header(k=int(P.Kind.BYE), reason=99)],
    "bye with a negative reason": [header(k=int(P.Kind.BYE), reason=-1)],
    "bye with text as reason": [header(k=int(P.Kind.BYE), reason="leaving")],
    "bye with text agent": [header(k=int(P.Kind.BYE), a="agent")],
    "error without code": [header(k=int(P.Kind.ERROR), ids=[])],
    "error of the old shape": [header(k=int(P.Kind.ERROR), message="refused", ids=[])],
    "error with an unknown code": [header(k=int(P.Kind.ERROR), code=99)],
    "error with code 0": [header(k=int(P.Kind.ERROR), code=0)],
    "error with text as code": [header(k=int(P.Kind.ERROR), code="MALFORMED")],
    "error with bytes detail": [header(k=int(P.Kind.ERROR), code=1, detail=b"why")],
    "truncated msgpack": [P.encode(P.Hello(P.Role.AGENT, "name"))[0][:-3]],
    "empty frame": [b""],
    "msgpack reserved byte": [b"\xc1"],
    "trailing bytes": [P.encode(P.Heartbeat())[0] + b"\x00"],
    "header is a list": [msgpack.packb([P.VERSION, 6])],
    "header is an int": [msgpack.packb(1)],
    "header is bytes": [msgpack.packb(b"\x81\xa1v\x02")],
    "map with int keys": [msgpack.packb({1: 1, "v": P.VERSION, "k": 6})],
    "huge declared array": [b"\xdd\xff\xff\xff\xff"],
    "items without items": [header(k=ITEMS)],
    "items with a short entry": [header(k=ITEMS, i=[[1, 0, 0]])],
    "items with a negative seq": [header(k=ITEMS, i=[[1, -1, 0, b"x"]])],
    "items with no payload at all": [header(k=ITEMS, i=[[1, 0, 0, b""]])],
    "items with inline data and frames": [header(k=ITEMS, i=[[1, 0, 1, b"x"]]), b"obj"],
    "items with a text credit": [header(k=ITEMS, i=[], c=[[1, "2"]])],
    "items with a short credit": [header(k=ITEMS, i=[], c=[[1]])],
    "feed with closed as a map": [header(k=FEED, i=[], closed={"1": 1})],
    "feed with a negative closed id": [header(k=FEED, i=[], closed=[-1])],
    "feed with a bool seq": [header(k=FEED, i=[[1, True, 0, b"x"]])],
    "feed declaring more frames than came": [header(k=FEED, i=[[1, 0, 2, b""]]), b"obj"],
    "task with empty refs": [header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, []]])],
    "task with a text ref digest": [header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, ["digest"]]])],
    "task with text refs": [header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, "refs"]])],
    "task with too many refs": [header(k=int(P.Kind.SUBMIT),
                                       t=[[1, D, 0, 0, b"x", 0, 0, [D] * (P.MAX_REFS + P.MAX_DEPS + 1)]])],
    "release without digests": [header(k=int(P.Kind.RELEASE))],
    "release of text": [header(k=int(P.Kind.RELEASE), d=["a" * 16])],
    "release of no digest": [header(k=int(P.Kind.RELEASE), d=[])],
    "task with no parts in the parts form": [header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, [], 0, 0]])],
    "task with fewer part bytes than parts": [header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, [], 3, 2]])],
    "task with parts past the message size": [
        header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, [], 1, P.MAX_MESSAGE_SIZE + 1]])],
    "task with parts past the frame limit": [
        header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, [], P.MAX_TASK_FRAMES, 1 << 20]])],
    "task with text parts": [header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, [], "2", 10]])],
    "task with parts and text refs": [header(k=int(P.Kind.SUBMIT), t=[[1, D, 0, 0, b"x", 0, 0, "r", 2, 10]])],
    "part without frames": [header(k=int(P.Kind.PART), id=1, seq=0, n=0)],
    "part declaring more frames than came": [header(k=int(P.Kind.PART), id=1, seq=0, n=2), b"x"],
    "part declaring fewer frames than came": [header(k=int(P.Kind.PART), id=1, seq=0, n=1), b"x", b"y"],
    "part with a negative seq": [header(k=int(P.Kind.PART), id=1, seq=-1, n=1), b"x"],
    "part without an id": [header(k=int(P.Kind.PART), seq=0, n=1), b"x"],
    "part with a text frame count": [header(k=int(P.Kind.PART), id=1, seq=0, n="1"), b"x"],
    "heartbeat with stats of the wrong shape": [header(k=int(P.Kind.HEARTBEAT), s=[1.0, 2, 3])],
    "heartbeat with a negative cpu": [header(k=int(P.Kind.HEARTBEAT), s=[-1.0, 2, 3, []])],
    "heartbeat with a worker of text": [header(k=int(P.Kind.HEARTBEAT), s=[1.0, 2, 3, [["1", 2, 3.0]]])],
    "control of an unknown action": [header(k=int(P.Kind.CONTROL), action="reboot")],
    "control without an action": [header(k=int(P.Kind.CONTROL))],
    "control to keep no worker": [header(k=int(P.Kind.CONTROL), action="workers", workers=0)],
    "control to keep too many workers": [header(k=int(P.Kind.CONTROL), action="workers", workers=P.MAX_WORKERS + 1)],
}


@pytest.mark.parametrize("frames", REJECTED.values(), ids=REJECTED.keys())
def test_malformed_message_is_refused(frames):
    with pytest.raises(ProtocolError):
        P.decode(frames)


def test_value_statuses_and_causes_do_not_mix_on_the_way_in():
    """What a careless sender builds is refused where it lands, not passed on."""
    for entry in (P.ResultEntry(1, P.Status.OK, (b"v",), cause=KILLED),
                  P.ResultEntry(1, P.Status.OK),
                  P.ResultEntry(1, P.Status.LOST, (b"killed",), cause=KILLED),
                  P.ResultEntry(1, P.Status.LOST, (b"a", b"b"), cause=KILLED),
                  P.ResultEntry(1, P.Status.TIMEOUT)):
        with pytest.raises(ProtocolError):
            round_trip(P.Result((entry,)))


def test_an_empty_message_is_refused():
    with pytest.raises(ProtocolError):
        P.decode([])
    with pytest.raises(ProtocolError):
        P.decode([b"peer"], 1)
    with pytest.raises(ProtocolError):
        P.decode_routed([])
    with pytest.raises(ProtocolError):
        P.decode_routed([b"peer"])


def test_oversize_header_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="limit"):
        P.decode([b"\x90" * (P.MAX_HEADER_BYTES + 1)])


def test_too_many_frames_are_refused():
    with pytest.raises(ProtocolError, match="limit"):
        P.decode([*P.encode(P.Heartbeat()), *[b""] * (P.MAX_FRAMES + 1)])
    with pytest.raises(ProtocolError, match="limit"):
        P.decode_routed([b"peer", *P.encode(P.Heartbeat()), *[b""] * (P.MAX_FRAMES + 1)])


@pytest.mark.parametrize("kind,key,row", [
    (P.Kind.SUBMIT, "t", lambda i: [i, D, 1, 0, b"", 0, 0]),
    (P.Kind.RESULT, "r", lambda i: [i, 0, 1, 0, b"", None]),
    (P.Kind.ITEMS, "i", lambda i: [i, 0, 1, b""]),
    (P.Kind.ITEMS, "c", lambda i: [i, 1]),
    (P.Kind.CANCEL, "ids", lambda i: i),
    (P.Kind.ACK, "ids", lambda i: i),
    (P.Kind.FEED, "closed", lambda i: i),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_header_with_too_many_entries_is_refused_before_they_are_read(kind, key, row):
    fields = {"t": [], "f": []} if kind is P.Kind.SUBMIT else {"i": []} if kind in (P.Kind.ITEMS, P.Kind.FEED) else {}
    fields[key] = [row(i) for i in range(P.MAX_ENTRIES + 1)]
    with pytest.raises(ProtocolError, match="over the"):
        P.decode([header(k=int(kind), **fields)])


# ---------------------------------------------------------------------- batches


def task(i, payload=(b"x",)):
    return P.TaskEntry(i, D, tuple(payload))


def runs(entries, **kwargs):
    return [[e.id for e in run] for run in P.batches(entries, **kwargs)]


def test_batches_of_nothing_is_no_run():
    assert list(P.batches([])) == []


def test_a_batch_that_fits_is_one_run():
    entries = [task(i) for i in range(5)]
    assert runs(entries) == [[0, 1, 2, 3, 4]]


def test_batches_split_by_entries():
    assert runs([task(i) for i in range(5)], max_entries=2) == [[0, 1], [2, 3], [4]]
    assert runs([task(i) for i in range(P.BATCH_MAX_TASKS + 1)]) == [list(range(P.BATCH_MAX_TASKS)),
                                                                     [P.BATCH_MAX_TASKS]]


def test_batches_split_by_bytes_going_over_by_at_most_one_entry():
    entries = [task(i, [b"x" * 10]) for i in range(5)]
    assert runs(entries, max_bytes=25) == [[0, 1, 2], [3, 4]]  # 20 bytes before the third: it goes too
    assert runs(entries, max_bytes=20) == [[0, 1], [2, 3], [4]]
    assert runs(entries, max_bytes=1) == [[0], [1], [2], [3], [4]]
    # bytes in frames count as well as inline ones
    assert runs([task(0, [b"a" * 10, b"b" * 10]), task(1)], max_bytes=20) == [[0], [1]]


def test_an_entry_larger_than_the_limits_goes_alone():
    assert runs([task(0, [BIG]), task(1), task(2)], max_bytes=10) == [[0], [1, 2]]
    many = [task(0, [b""] * 10), task(1)]
    assert runs(many, reserved_frames=P.MAX_FRAMES - 3) == [[0], [1]]


def test_batches_split_by_frames_keeping_room_for_function_blobs():
    entries = [task(i, [b"a", b"b"]) for i in range(5)]  # two frames each
    assert runs(entries, reserved_frames=P.MAX_FRAMES - 5) == [[0, 1], [2, 3], [4]]
    assert runs(entries, reserved_frames=P.MAX_FRAMES - 4) == [[0, 1], [2, 3], [4]]
    assert runs(entries, reserved_frames=P.MAX_FRAMES - 3) == [[0], [1], [2], [3], [4]]
    # inline payloads take no frame: they all fit with no frame to spare
    assert runs([task(i) for i in range(5)], reserved_frames=P.MAX_FRAMES) == [[0, 1, 2, 3, 4]]
    # one frame over INLINE_MAX takes a frame
    assert runs([task(i, [BIG]) for i in range(3)], max_bytes=1 << 30, reserved_frames=P.MAX_FRAMES - 2) \
        == [[0, 1], [2]]


def test_batches_split_at_the_frame_limit_on_their_own():
    per = P.MAX_FRAMES // 4 + 1
    entries = [task(i, [b""] * per) for i in range(4)]
    assert runs(entries) == [[0, 1, 2], [3]]
    for run in P.batches(entries):
        assert len(P.encode(P.Tasks(tuple(run)))) - 1 <= P.MAX_FRAMES


def test_batches_split_results_and_items_alike():
    results = [P.ResultEntry(i, P.Status.OK, (b"v" * 10,)) for i in range(3)] + \
              [P.ResultEntry(9, P.Status.LOST, cause=KILLED)]
    assert runs(results, max_bytes=15) == [[0, 1], [2, 9]]
    items = [P.ItemEntry(1, seq, (b"o", b"b")) for seq in range(3)]
    assert [[e.seq for e in run] for run in P.batches(items, reserved_frames=P.MAX_FRAMES - 4)] == [[0, 1], [2]]


def wire_frames(entry) -> int:
    p = entry.payload
    return 0 if len(p) == 1 and len(p[0]) <= P.INLINE_MAX else len(p)


sized_payloads = st.one_of(
    st.binary(min_size=1, max_size=40).map(lambda b: (b,)),
    st.lists(st.binary(max_size=20), min_size=2, max_size=6).map(tuple),
    st.just((BIG,)),
)


@given(st.lists(sized_payloads, max_size=30), st.integers(1, 8), st.integers(1, P.INLINE_MAX * 3),
       st.integers(0, 12))
def test_batches_cover_every_entry_in_order_within_the_limits(payloads, max_entries, max_bytes, room):
    entries = [task(i, p) for i, p in enumerate(payloads)]
    reserved = P.MAX_FRAMES - room
    out = [list(run) for run in P.batches(entries, max_entries, max_bytes, reserved)]
    assert [e for run in out for e in run] == entries
    for i, run in enumerate(out):
        assert 1 <= len(run) <= max_entries
        if len(run) > 1:  # past the first entry, each went in while there was room
            assert sum(P.payload_bytes(e.payload) for e in run[:-1]) < max_bytes
            assert sum(wire_frames(e) for e in run) <= room
        if i + 1 < len(out):  # and the run stopped because the next did not fit
            nxt = out[i + 1][0]
            assert (len(run) == max_entries or sum(P.payload_bytes(e.payload) for e in run) >= max_bytes
                    or sum(wire_frames(e) for e in run) + wire_frames(nxt) > room)


# ---------------------------------------------------------------------- properties

ids_ = st.integers(0, 2**63 - 1)
small = st.integers(0, 2**32)
texts = st.text(max_size=12)
payloads = st.one_of(
    st.binary(min_size=1, max_size=8).map(lambda b: (b,)),  # inline
    st.lists(st.binary(max_size=8), min_size=2, max_size=3).map(tuple),  # in frames
    st.just((BIG,)),  # one frame, too big to go inline
)
causes = st.builds(P.Cause, texts, small, st.none() | st.integers(-2**31, 2**31), st.none() | st.integers(1, 64),
                   st.integers(0, P.MAX_RETRIES + 1), texts)
funcs = st.lists(st.builds(P.Function, st.binary(min_size=1, max_size=16), st.binary(max_size=4),
                           st.text(max_size=P.MAX_NAME)), max_size=2)
refs = st.lists(st.binary(min_size=1, max_size=16), max_size=3).map(tuple)
scheds = st.none() | st.builds(
    P.Sched, st.integers(P.MIN_PRIORITY, P.MAX_PRIORITY),
    st.dictionaries(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=8),
                    st.integers(0, 1 << 40) | st.floats(0, 1e12), max_size=3).map(lambda d: tuple(sorted(d.items()))),
    small, st.lists(ids_, max_size=4).map(tuple), st.just(0))
task_entries = (st.builds(P.TaskEntry, ids_, st.binary(min_size=1, max_size=16), payloads, st.integers(0, 3),
                          st.integers(0, P.MAX_RETRIES), small, refs, st.just(0), st.just(0), scheds)
                | st.builds(lambda entry, parts, extra: entry._replace(parts=parts, part_bytes=parts + extra),
                            st.builds(P.TaskEntry, ids_, st.binary(min_size=1, max_size=16), payloads,
                                      st.integers(0, 3), st.integers(0, P.MAX_RETRIES), small, refs,
                                      st.just(0), st.just(0), scheds),
                            st.integers(1, P.MAX_TASK_FRAMES - 1), st.integers(0, 1 << 29)))
value_results = st.builds(P.ResultEntry, ids_, st.sampled_from(sorted(P.VALUE_STATUSES)), payloads, small,
                          st.none(),  # no cause (left out, builds would make one up)
                          st.integers(0, 2**31), st.text(max_size=64))
cause_results = st.builds(lambda i, s, us, c: P.ResultEntry(i, s, (), us, c), ids_,
                          st.sampled_from(sorted(set(P.Status) - P.VALUE_STATUSES)), small, causes)
result_entries = value_results | cause_results
item_entries = st.builds(P.ItemEntry, ids_, ids_, payloads)
credits = st.lists(st.builds(P.Credit, ids_, ids_), max_size=3).map(tuple)
json_like = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | texts
                         | st.floats(allow_nan=False),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                         max_leaves=8)
messages = st.one_of(
    st.builds(P.Hello, st.sampled_from(list(P.Role)), texts, texts, small, small),
    st.builds(P.Welcome, texts, st.floats(0, 1e6), small, texts, small),
    st.builds(P.Submit, st.lists(task_entries, max_size=4).map(tuple), funcs.map(tuple)),
    st.builds(P.Tasks, st.lists(task_entries, max_size=4).map(tuple), funcs.map(tuple)),
    st.builds(P.Ready, small),
    st.builds(P.Heartbeat, small),
    st.builds(P.Result, st.lists(result_entries, max_size=4).map(tuple), st.binary(max_size=8), texts),
    st.builds(P.Cancel, st.lists(ids_, max_size=4).map(tuple), st.booleans()),
    st.builds(P.StatusMsg, st.dictionaries(texts, json_like, max_size=4)),
    st.builds(P.Bye, st.sampled_from(list(P.ByeReason)), st.binary(max_size=8)),
    st.builds(P.Error, st.sampled_from(list(P.ErrorCode)), st.lists(ids_, max_size=3).map(tuple), texts),
    st.builds(P.Ack, st.lists(ids_, max_size=4).map(tuple)),
    st.builds(P.Items, st.lists(item_entries, max_size=4).map(tuple), credits, st.binary(max_size=8), texts),
    st.builds(P.Feed, st.lists(item_entries, max_size=4).map(tuple), credits, st.lists(ids_, max_size=3).map(tuple)),
    st.builds(P.Part, ids_, ids_, st.lists(st.binary(max_size=8), min_size=1, max_size=3).map(tuple)),
    st.builds(P.Control, st.just(P.Action.WORKERS), st.integers(1, P.MAX_WORKERS)),
    st.just(P.Control(P.Action.DRAIN)),
)


def frames_of(msg) -> int:
    """Payload frames ``msg`` takes beside its header."""
    if isinstance(msg, (P.Submit, P.Tasks)):
        return len(msg.funcs) + sum(wire_frames(t) for t in msg.tasks)
    if isinstance(msg, P.Result):
        return sum(wire_frames(r) for r in msg.results if r.payload)
    if isinstance(msg, (P.Items, P.Feed)):
        return sum(wire_frames(i) for i in msg.items)
    if isinstance(msg, P.Part):
        return len(msg.payload)
    return 0


@given(messages)
def test_any_valid_message_round_trips(msg):
    frames = P.encode(msg)
    assert len(frames) == 1 + frames_of(msg)
    assert norm(P.decode(frames)) == norm(msg)
    peer, got = P.decode_routed(P.encode_routed(b"p", msg))
    assert peer == b"p" and norm(got) == norm(msg)


def decode_or_protocol_error(frames):
    try:
        P.decode(frames)
    except ProtocolError:
        pass  # anything else propagates and fails the test


@given(st.lists(st.binary(max_size=256), min_size=1, max_size=8))
def test_random_bytes_give_a_message_or_protocol_error(frames):
    decode_or_protocol_error(frames)


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | texts | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=4), max_leaves=12)


def damage(value, data):
    """``value`` with one element, at any depth of its lists, replaced by anything."""
    if isinstance(value, list) and value and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value) - 1))
        value[i] = damage(value[i], data)
        return value
    return data.draw(anything)


@given(messages, st.data())
def test_mutated_valid_headers_give_a_message_or_protocol_error(msg, data):
    header_frame, *payload = P.encode(msg)
    h = msgpack.unpackb(header_frame)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["drop", "set", "nested"]))
        key = data.draw(st.sampled_from([*sorted(h), "extra"]))
        if action == "drop":
            h.pop(key, None)
        elif action == "set":
            h[key] = data.draw(anything)
        elif isinstance(h.get(key), list) and h[key]:  # damage one entry of a list field, or a part of one
            h[key] = damage(h[key], data)
    keep = data.draw(st.sampled_from([len(payload), 0, 1, 3]))
    frames = [msgpack.packb(h, use_bin_type=True), *(payload + [b"extra"] * 3)[:keep]]
    decode_or_protocol_error(frames)


@given(messages, st.data())
def test_byte_level_damage_gives_a_message_or_protocol_error(msg, data):
    header_frame, *payload = P.encode(msg)
    frame = bytearray(header_frame)
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
    decode_or_protocol_error([bytes(frame), *payload])


@given(messages, st.data())
def test_a_damaged_frame_list_gives_a_message_or_protocol_error(msg, data):
    frames = [as_bytes(f) for f in P.encode(msg)]
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["drop", "insert", "duplicate", "swap", "replace"]))
        i = data.draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "drop" and frames:
            del frames[i]
        elif op == "insert":
            frames.insert(i, data.draw(st.binary(max_size=16)))
        elif op == "duplicate" and frames:
            frames.insert(i, frames[i])
        elif op == "swap" and len(frames) > 1:
            j = data.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "replace" and frames:
            frames[i] = data.draw(st.binary(max_size=16))
    decode_or_protocol_error(frames)


def test_shipped_sends_each_function_blob_once_until_forgotten():
    other = b"\x02" * 16
    blobs = {D: BLOB, other: b"other blob"}
    shipped = P.Shipped()
    batch = [task(1), P.TaskEntry(2, other, (b"x",)), task(3)]
    assert shipped.functions(batch, blobs.__getitem__) == (P.Function(D, BLOB), P.Function(other, b"other blob"))
    assert shipped.functions(batch, blobs.__getitem__) == ()
    shipped.forget([other])
    assert shipped.functions(batch, blobs.__getitem__) == (P.Function(other, b"other blob"),)
    shipped.forget()
    assert shipped.functions(batch[2:], blobs.__getitem__) == (P.Function(D, BLOB),)
