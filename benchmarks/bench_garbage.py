#!/usr/bin/env python
"""Garbage benchmark (RELIABILITY.md C3/C4, issue 10): malformed messages on every broker port.

    python benchmarks/bench_garbage.py [--quick] [--cases insecure,unauth,auth] [--messages N] [--json out.json]

Three cases, each on a fresh ``LocalCluster(agents=1, workers=2)``:

- ``insecure``: an ``insecure=True`` cluster (no authentication), plaintext
  attackers whose messages all reach the broker's code;
- ``unauth``: a cluster with the default authentication (this user's own
  secret, made in a private ``XDG_CONFIG_HOME``), attackers without it: ZeroMQ
  sockets in plaintext and in CurveZMQ with a key of their own (they know the
  broker's public key), retrying the handshake every 10 ms, and raw TCP
  garbage at the ports; none of it gets past the handshake;
- ``auth``: the same default cluster, attackers holding the secret (each
  socket with the keys of the role it poses as): every malformed message
  comes after a good handshake and is read, decoded and refused.

In each, a well-behaved producer runs
``list(client.map(tiny, range(M), chunksize=C))`` (M = 50,000; 20,000 with
``--quick``; C = 1), 3 times, alone. Then attacker processes send N
malformed messages (100,000; 10,000 with ``--quick``) to the broker while the
same producer runs the same map again, at least 3 times, for as long as the
attack lasts. The attack is paced at ``--rate`` messages/s in all (5,000:
100,000 take 20 s; ``--attack-seconds`` to spread it over a given time,
``--flood`` to send as fast as the attackers can). The attackers' own CPU
time is reported: on a 2-core box they take a share of the machine from the
producer whatever the broker does, so the report also gives the broker's CPU
time per bad message.

What is sent (all to 127.0.0.1, every loop bounded in count and time):

- raw TCP to the frontend, backend and collector ports (not in ``auth``):
  random bytes, a valid ZMTP greeting followed by junk, a wrong security
  mechanism or ZMTP version, a valid handshake followed by a frame declaring
  2^62 bytes or just under ``MAXMSGSIZE``, a valid handshake followed by
  garbage frames, and idle connections held open for the whole attack;
- over ZeroMQ (DEALERs to frontend and backend, some of them after a valid
  producer HELLO, and one that never reads its replies; PUSH to the collector):
  random bytes, truncated msgpack, valid msgpack of the wrong types, a wrong
  protocol version, unknown kinds, huge declared msgpack lengths, a header
  over ``MAX_HEADER_BYTES``, a header just under it made of empty maps,
  messages of 200,000 empty frames, kinds a socket does not take, and
  SUBMIT/TASKS/RESULT headers whose frame counts lie (small, and a few
  declaring ``MAX_ENTRIES`` task entries).

The report, per case: broker alive at the end, broker RSS before / peak /
after, the broker's counters (their change over the attack), what the
attackers sent and the replies they got, the producer's throughput with and
without the attack and their ratio (bar: median under attack / median alone
>= 0.8; the ratio of the best runs is printed too), and that every result was
right; then a summary of the cases. Exit code 0 when the bars hold in every
case, 1 when one is missed, 2 when the benchmark itself broke. Every wait has
a deadline, and every process started here is stopped.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import psutil

# benchmarks/ is on sys.path
from _cluster import RssWatch, StallWatch, private_config_home, start_cluster, stop_cluster, summarize_log
from _common import count_zpar_logs, finish_run, print_verdicts

now = time.monotonic

#: Who attacks which cluster (each case on a fresh cluster).
CASES = {
    "insecure": "an --insecure cluster, plaintext attackers",
    "unauth": "default authentication (this user's secret), attackers without it: plaintext and CurveZMQ with "
              "a key of their own (the broker's public key known), raw TCP garbage at the ports",
    "auth": "default authentication, attackers holding the secret: malformed messages after a good handshake",
}

# ---------------------------------------------------------------------- what attackers send
# (this part imports only the standard library, msgpack and zmq)

V, SUBMIT, TASKS, READY, HEARTBEAT, RESULT, CANCEL, STATUS, BYE, ERROR = 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
HELLO, WELCOME = 1, 2
# zpar.protocol's limits, repeated so that an attacker imports no zpar (main() checks they still agree)
MAX_HEADER_BYTES = 2 * 1024 * 1024
MAX_FRAMES = 10_000
MAX_ENTRIES = 10_000

#: Weighted categories of single messages; "special" ones come a fixed number of times.
WEIGHTS = {
    "random_bytes": 18, "truncated_msgpack": 14, "wrong_types": 20, "wrong_version": 8, "unknown_kind": 8,
    "huge_msgpack_lengths": 8, "lying_frame_counts": 16, "kind_not_for_socket": 8,
}
SPECIAL = ("too_many_frames", "header_over_limit", "big_lying_submit", "empty_maps_header")


def _pack(obj: Any) -> bytes:
    import msgpack
    return msgpack.packb(obj, use_bin_type=True)


def _valid_headers(rng: random.Random) -> list[bytes]:
    """Well-formed headers of every kind (cut short by the truncation category)."""
    d = rng.randbytes(8)
    return [
        _pack({"v": V, "k": SUBMIT, "t": [[i, d, 0, 0, rng.randbytes(rng.randint(1, 40)), 3, 0]
                                          for i in range(rng.randint(1, 30))], "f": [d]}),
        _pack({"v": V, "k": RESULT, "r": [[i, 0, 0, 5, rng.randbytes(8), None] for i in range(rng.randint(1, 30))],
               "a": rng.randbytes(16), "e": "x" * 32}),
        _pack({"v": V, "k": HELLO, "role": "producer", "name": "n" * rng.randint(0, 50), "host": "h", "pid": 1,
               "workers": 0}),
        _pack({"v": V, "k": TASKS, "t": [[1, d, 0, 0, b"xx", 0, 0]], "f": []}),
        _pack({"v": V, "k": CANCEL, "ids": list(range(rng.randint(0, 50))), "force": True}),
        _pack({"v": V, "k": STATUS, "info": {}}),
        _pack({"v": V, "k": READY, "n": 4}),
    ]


def _wrong_types(rng: random.Random) -> bytes:
    d = rng.randbytes(8)
    choices: list[Any] = [
        42, -1, 2**64 - 1, -2**63, 1.5, None, True, "a string", b"bytes", [], [1, 2, 3], [V, SUBMIT],
        {"v": "1", "k": 3}, {"v": 1.0, "k": 3}, {"v": True, "k": 3}, {"v": None, "k": 3}, {"v": [1], "k": 3},
        {"v": V}, {"v": V, "k": "3"}, {"v": V, "k": 3.0}, {"v": V, "k": None}, {"v": V, "k": True},
        {"v": V, "k": [3]}, {"v": V, "k": {"x": 1}},
        {"v": V, "k": SUBMIT}, {"v": V, "k": SUBMIT, "t": "tasks"}, {"v": V, "k": SUBMIT, "t": {"a": 1}},
        {"v": V, "k": SUBMIT, "t": [1, 2, 3]}, {"v": V, "k": SUBMIT, "t": [[1, 2]]},
        {"v": V, "k": SUBMIT, "t": [["id", d, 0, 0, b"x", 0, 0]]},
        {"v": V, "k": SUBMIT, "t": [[-5, d, 0, 0, b"x", 0, 0]]},
        {"v": V, "k": SUBMIT, "t": [[1, "digest", 0, 0, b"x", 0, 0]]},
        {"v": V, "k": SUBMIT, "t": [[1, d, -1, 0, b"x", 0, 0]]},
        {"v": V, "k": SUBMIT, "t": [[1, d, 0, 0, "str", 0, 0]]}, {"v": V, "k": SUBMIT, "t": [[1, d, 0, 0, b"", 0, 0]]},
        {"v": V, "k": SUBMIT, "t": [[1, d, 0, 0, b"x", 10**6, 0]]},
        {"v": V, "k": SUBMIT, "t": [[1, d, 0, 0, b"x", 0, -1]]},
        {"v": V, "k": SUBMIT, "t": [[1, d, 0, 0, b"x", True, 0]]}, {"v": V, "k": SUBMIT, "t": [], "f": "x"},
        {"v": V, "k": SUBMIT, "t": [], "f": [1, 2]},
        {"v": V, "k": SUBMIT, "t": [[2**64 - 1, d, 0, 2**64 - 1, b"x", 0, 0]]},
        {"v": V, "k": RESULT}, {"v": V, "k": RESULT, "r": "x"}, {"v": V, "k": RESULT, "r": [[1, 99, 0, 0, b"x"]]},
        {"v": V, "k": RESULT, "r": [[1, 0, 0, -1, b"x"]]}, {"v": V, "k": RESULT, "r": [[1, 0, 0, 0, b""]]},
        {"v": V, "k": RESULT, "r": [[1, 0, 0, 0, b"x"]], "a": "not bytes"}, {"v": V, "k": RESULT, "r": [], "e": 5},
        {"v": V, "k": RESULT, "r": [[1, True, 0, 0, b"x"]]}, {"v": V, "k": RESULT, "r": [[1, 0, 0, 0, b"x", 9]]},
        {"v": V, "k": HELLO}, {"v": V, "k": HELLO, "role": "emperor"}, {"v": V, "k": HELLO, "role": 5},
        {"v": V, "k": HELLO, "role": "producer", "pid": -1}, {"v": V, "k": HELLO, "role": "producer", "workers": "2"},
        {"v": V, "k": HELLO, "role": "producer", "name": b"bytes"},
        {"v": V, "k": WELCOME}, {"v": V, "k": WELCOME, "epoch": 1, "heartbeat": "x", "liveness": -3},
        {"v": V, "k": READY}, {"v": V, "k": READY, "n": -1}, {"v": V, "k": READY, "n": 2.5},
        {"v": V, "k": READY, "n": "9"},
        {"v": V, "k": HEARTBEAT, "busy": -1}, {"v": V, "k": HEARTBEAT, "busy": "x"},
        {"v": V, "k": CANCEL}, {"v": V, "k": CANCEL, "ids": "x"}, {"v": V, "k": CANCEL, "ids": [-1]},
        {"v": V, "k": CANCEL, "ids": ["a"]}, {"v": V, "k": CANCEL, "ids": [1], "force": "yes"},
        {"v": V, "k": STATUS, "info": [1]}, {"v": V, "k": BYE, "reason": 7}, {"v": V, "k": BYE, "a": 7},
        {"v": V, "k": ERROR}, {"v": V, "k": ERROR, "message": 1}, {"v": V, "k": ERROR, "message": "m", "ids": [-4]},
    ]
    pick = rng.randrange(len(choices) + 3)
    if pick == len(choices):  # integer map keys (strict_map_key refuses them)
        return b"\x82\x01\x01\x02\x03"
    if pick == len(choices) + 1:  # deep nesting: 100,000 one-element arrays
        return b"\x91" * 100_000 + b"\x00"
    if pick == len(choices) + 2:  # a valid header with trailing bytes
        return _pack({"v": V, "k": HEARTBEAT}) + rng.randbytes(rng.randint(1, 20))
    return _pack(choices[pick])


def _huge_lengths(rng: random.Random) -> bytes:
    big = b"\xff\xff\xff\xff"
    return rng.choice([
        b"\xdd" + big,  # array32 of 4 billion entries, none sent
        b"\xdf" + big,  # map32
        b"\xc6" + big + b"x",  # bin32
        b"\xdb" + big + b"x",  # str32
        b"\xc9" + big + b"\x01",  # ext32
        b"\x83\xa1v\x01\xa1k\x03\xa1t\xdd" + big,  # {"v":1,"k":3,"t": array32 of 4 billion}
        b"\x83\xa1v\x01\xa1k\x07\xa1r\xdd\x00\x10\x00\x00\x95\x01\x00\x00\x00\xc6" + big,
        b"\x82\xa1v\x01\xa1k\xcf" + b"\xff" * 8,  # kind = 2^64-1
    ])


def _lying(rng: random.Random, kinds: tuple[int, ...]) -> list[bytes]:
    """A SUBMIT, TASKS or RESULT header whose declared frame count is not what comes with it."""
    d = rng.randbytes(8)
    k = rng.choice(kinds)
    n = rng.randint(1, 20)
    declared = [rng.choice([1, 2, 3, 1000, 2**31, 2**62, 2**64 - 1]) for _ in range(n)]
    nf = 0
    if k == RESULT:
        header = {"v": V, "k": RESULT, "r": [[i, rng.choice([0, 1, 6]), declared[i], 7, b"", None] for i in range(n)]}
    else:
        nf = rng.randint(0, 3)  # function blobs are payload frames too
        header = {"v": V, "k": k, "t": [[i, d, declared[i], rng.randint(0, 1), b"", 1, 0] for i in range(n)],
                  "f": [rng.randbytes(8) for _ in range(nf)]}
    declared_total = sum(declared) + nf
    sent = rng.choice([0, 1, 2, 5, max(0, declared_total - 1) % 50, (declared_total + 1) % 50])
    if sent == declared_total:
        sent += 1
    return [_pack(header)] + [rng.randbytes(rng.randint(0, 16)) for _ in range(sent)]


def _kind_not_for_socket(rng: random.Random, target: str) -> list[bytes]:
    """Well-formed messages of kinds this socket's peers may not send (or not yet)."""
    d = rng.randbytes(8)
    if target == "frontend":
        options = [{"v": V, "k": WELCOME, "epoch": "e", "heartbeat": 1.0, "liveness": 3},
                   {"v": V, "k": TASKS, "t": [[1, d, 0, 0, b"x", 0, 0]], "f": []}, {"v": V, "k": READY, "n": 5},
                   {"v": V, "k": RESULT, "r": [[1, 0, 0, 0, b"x", None]]}, {"v": V, "k": ERROR, "code": 1, "ids": [1]}]
    elif target == "backend":
        options = [{"v": V, "k": SUBMIT, "t": [[1, d, 0, 0, b"x", 0, 0]], "f": []}, {"v": V, "k": READY, "n": 5},
                   {"v": V, "k": HEARTBEAT, "busy": 1}, {"v": V, "k": CANCEL, "ids": [1]},
                   {"v": V, "k": WELCOME, "epoch": "e", "heartbeat": 1.0, "liveness": 3},
                   {"v": V, "k": ERROR, "code": 2}, {"v": V, "k": BYE, "reason": 0}]
    else:  # collector: anything but RESULT (or BYE naming an agent)
        options = [{"v": V, "k": HELLO, "role": "agent", "name": "x", "workers": 9}, {"v": V, "k": READY, "n": 5},
                   {"v": V, "k": SUBMIT, "t": [[1, d, 0, 0, b"x", 0, 0]], "f": []}, {"v": V, "k": HEARTBEAT},
                   {"v": V, "k": STATUS, "info": {}}, {"v": V, "k": BYE, "a": rng.randbytes(16)},
                   {"v": V, "k": CANCEL, "ids": [1, 2]}]
    return [_pack(rng.choice(options))]


def make_message(category: str, rng: random.Random, target: str) -> list[bytes]:
    if category == "random_bytes":
        return [rng.randbytes(rng.randint(0, 512)) for _ in range(rng.choice([1, 1, 1, 2, 5]))]
    if category == "truncated_msgpack":
        h = rng.choice(_valid_headers(rng))
        return [h[:rng.randrange(len(h))]]
    if category == "wrong_types":
        return [_wrong_types(rng)]
    if category == "wrong_version":
        v = rng.choice([99, 0, 2, -1, 2**64 - 1, 255])
        return [_pack({"v": v, "k": rng.choice([SUBMIT, HELLO, RESULT, READY])})]
    if category == "unknown_kind":
        return [_pack({"v": V, "k": rng.choice([0, 12, 13, 99, 255, -1, 2**32, 2**63])})]
    if category == "huge_msgpack_lengths":
        return [_huge_lengths(rng)]
    if category == "lying_frame_counts":
        kinds = {"frontend": (SUBMIT, SUBMIT, RESULT), "backend": (RESULT, TASKS, SUBMIT),
                 "collector": (RESULT,)}[target]
        return _lying(rng, kinds)
    if category == "kind_not_for_socket":
        return _kind_not_for_socket(rng, target)
    if category == "too_many_frames":
        return [_pack({"v": V, "k": rng.choice([SUBMIT, RESULT, HEARTBEAT])})] + [b""] * 200_000
    if category == "header_over_limit":
        return [b"\x83" + os.urandom(MAX_HEADER_BYTES + 1)]
    if category == "big_lying_submit":  # MAX_ENTRIES well-formed task entries, frames missing: all checked, refused
        d = rng.randbytes(8)
        k = RESULT if target == "collector" else SUBMIT
        if k == RESULT:
            return [_pack({"v": V, "k": RESULT, "r": [[i, 0, 1, 1, b"", None] for i in range(MAX_ENTRIES)]})]
        return [_pack({"v": V, "k": SUBMIT, "t": [[i, d, 1, 0, b"", 0, 0] for i in range(MAX_ENTRIES)], "f": []})]
    if category == "empty_maps_header":
        return [empty_maps_header(RESULT if target == "collector" else SUBMIT)]
    raise ValueError(category)


def empty_maps_header(kind: int, size: int = MAX_HEADER_BYTES) -> bytes:
    """A header just under ``size`` bytes whose task list is rows of empty maps (one byte each on the wire).

    Each becomes a dict of ~64 bytes in a decoder with no bound on the
    containers it builds: issue 10 measured 647 MB and a 0.78 s stall for one
    8 MiB header of them. Arrays stay within MAX_ENTRIES, so only a count of
    the containers built can refuse it.
    """
    fields = _pack({"v": V, "k": kind})[1:]  # the two fields, without their map's own header byte
    key = _pack("r" if kind == RESULT else "t")
    row = b"\xdc" + MAX_ENTRIES.to_bytes(2, "big") + b"\x80" * MAX_ENTRIES  # array16 of empty maps
    rows = (size - len(fields) - len(key) - 8) // len(row)
    return b"\x83" + fields + key + b"\xdc" + rows.to_bytes(2, "big") + row * rows  # a map of three fields


def plan(n: int, specials: int, rng: random.Random, only: list[str] | None = None) -> list[str]:
    """``n`` categories in a random order, with ``specials`` of each special spread evenly."""
    cats = [c for c in WEIGHTS if not only or c in only]
    weights = [WEIGHTS[c] for c in cats]
    chosen = [c for c in SPECIAL if not only or c in only]
    if not cats and chosen:  # only costly kinds asked for: n of them
        specials = -(-n // len(chosen))
    out = rng.choices(cats, weights, k=max(0, n - specials * len(chosen))) if cats else []
    for j in range(specials):
        for s in chosen:
            out.insert(min(len(out), int((j + 0.5) * len(out) / max(1, specials))), s)
    return out[:n]


# ---------------------------------------------------------------------- raw TCP

def zmtp_greeting(mechanism: bytes = b"NULL", major: int = 3, minor: int = 0) -> bytes:
    return (b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([major, minor]) + mechanism.ljust(20, b"\x00") + b"\x00"
            + b"\x00" * 31)


def zmtp_ready(socket_type: bytes) -> bytes:
    name = b"Socket-Type"
    body = b"\x05READY" + bytes([len(name)]) + name + len(socket_type).to_bytes(4, "big") + socket_type
    return b"\x04" + bytes([len(body)]) + body


def zmtp_frame(body: bytes, more: bool = False) -> bytes:
    if len(body) < 256:
        return bytes([1 if more else 0, len(body)]) + body
    return bytes([3 if more else 2]) + len(body).to_bytes(8, "big") + body


RAW_KINDS = ("random", "greeting_then_junk", "wrong_mechanism", "zmtp_v1_v2", "declared_2_62",
             "declared_under_max", "handshake_then_garbage_frames")


def raw_payload(kind: str, rng: random.Random, socket_type: bytes, max_msg: int) -> bytes:
    if kind == "random":
        return rng.randbytes(rng.randint(1, 4096))
    if kind == "greeting_then_junk":
        return zmtp_greeting() + rng.randbytes(rng.randint(1, 2048))
    if kind == "wrong_mechanism":
        return zmtp_greeting(rng.choice([b"CURVE", b"PLAIN", b"GSSAPI", b"XXXX"])) + rng.randbytes(64)
    if kind == "zmtp_v1_v2":
        return zmtp_greeting(major=rng.choice([1, 2, 9]))[:rng.choice([10, 11, 12, 64])] + rng.randbytes(256)
    hs = zmtp_greeting() + zmtp_ready(socket_type)
    if kind == "declared_2_62":
        return hs + b"\x02" + (2**62).to_bytes(8, "big") + rng.randbytes(1024)
    if kind == "declared_under_max":  # a length just under MAXMSGSIZE, then 64 KiB of it and a hang-up
        return hs + b"\x02" + (max_msg - 1).to_bytes(8, "big") + rng.randbytes(65536)
    frames = [zmtp_frame(rng.randbytes(rng.randint(0, 300)), more=i < 2) for i in range(3)]
    return hs + b"".join(frames)


# ---------------------------------------------------------------------- an attacker process


def attacker_main(spec_path: str) -> int:
    """One attacker: its own process, so it competes for the machine but not for our GIL."""
    import zmq

    with open(spec_path) as fh:
        spec = json.load(fh)
    role, n, duration, hard_stop = spec["role"], spec["messages"], spec["duration"], spec["hard_stop"]
    rng = random.Random(spec["seed"])
    t0 = now()
    stop_at = t0 + hard_stop
    stats: dict[str, Any] = {"role": role, "sent": collections.Counter(), "send_failed": collections.Counter(),
                             "replies": collections.Counter(), "raw_errors": collections.Counter(), "connections": 0}

    def pace(i: int, total: int) -> bool:
        """Sleep until message i is due; False once past the hard stop."""
        if now() > stop_at:
            return False
        if duration > 0:
            due = t0 + duration * i / max(1, total)
            ahead = due - now()
            if ahead > 0.001:
                time.sleep(ahead)
        return True

    if role == "raw":
        ports = spec["ports"]  # name -> (port, socket type)
        held: list[socket.socket] = []
        try:
            for name, (port, _st) in ports.items():  # idle connections held for the whole attack
                for _ in range(spec["held_per_port"]):
                    try:
                        s = socket.create_connection(("127.0.0.1", port), timeout=1.0)
                        held.append(s)
                        stats["sent"][f"{name}:idle_held"] += 1
                    except OSError as exc:
                        stats["raw_errors"][f"{name}:{type(exc).__name__}"] += 1
            for i in range(n):
                if not pace(i, n):
                    break
                name = rng.choice(list(ports))
                port, st = ports[name]
                kind = rng.choices(RAW_KINDS, [50, 12, 8, 8, 4, 3, 15])[0]
                data = raw_payload(kind, rng, st.encode(), spec["max_message_size"])
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                        s.settimeout(1.0)
                        s.sendall(data)
                        if kind.startswith("declared") or kind == "handshake_then_garbage_frames":
                            time.sleep(0.002)  # let the broker read it before the hang-up
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    stats["sent"][f"{name}:{kind}"] += 1
                except OSError as exc:  # reset by the peer is a fine answer to garbage
                    stats["raw_errors"][f"{name}:{kind}:{type(exc).__name__}"] += 1
                    stats["sent"][f"{name}:{kind}"] += 1
            while now() < t0 + duration and now() < stop_at:  # keep the idle ones until the end
                time.sleep(0.05)
        finally:
            for s in held:
                s.close()
    else:
        ctx = zmq.Context()
        address = spec["address"]
        socks: list[tuple[Any, bool]] = []  # (socket, reads its replies)
        kind = zmq.PUSH if role == "collector" else zmq.DEALER
        nsocks = 1 if role == "collector" else 6
        for j in range(nsocks):
            s = ctx.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 10_000)
            s.setsockopt(zmq.SNDTIMEO, spec.get("sndtimeo", 2000))
            s.setsockopt(zmq.IMMEDIATE, 1 if spec.get("server_key") else 0)  # no pipe before a handshake
            if spec.get("curve"):  # holds the secret: the keypair of the role this socket serves
                s.curve_publickey = spec["curve"]["public"].encode()
                s.curve_secretkey = spec["curve"]["secret"].encode()
                s.curve_serverkey = spec["curve"]["server"].encode()
            elif spec.get("server_key") and j % 2:
                # CurveZMQ with a key of its own and the broker's public key (leaked, or key-file mode); the
                # other sockets speak plaintext (NULL) to a CurveZMQ port
                public, secret = zmq.curve_keypair()
                s.curve_publickey, s.curve_secretkey = public, secret
                s.curve_serverkey = spec["server_key"].encode()
            s.connect(address)
            deaf = role != "collector" and j == nsocks - 1  # never reads what the broker answers
            if role == "frontend" and j % 2 == 1:  # a "producer" that said HELLO before its garbage
                try:
                    s.send(_pack({"v": V, "k": HELLO, "role": "producer", "name": "attacker", "host": "h",
                                  "pid": os.getpid(), "workers": 0}))
                except zmq.Again:  # unauth: not connected (and never will be)
                    stats["send_failed"]["hello"] += 1
            socks.append((s, role != "collector" and not deaf))
        cats = plan(n, spec["specials"], rng, spec.get("categories"))
        churn = spec.get("reconnect_every", 0)  # unauthenticated: a refused handshake is not retried by ZeroMQ
        try:
            for i, cat in enumerate(cats):
                if not pace(i, len(cats)):
                    break
                s, _ = socks[i % len(socks)]
                if churn and i >= len(socks) and (i // len(socks)) % churn == 0:  # this socket: a new connection
                    s.disconnect(address)
                    s.connect(address)
                    stats["connections"] += 1
                frames = make_message(cat, rng, role)
                try:
                    s.send_multipart(frames)
                    stats["sent"][cat] += 1
                except zmq.ZMQError as exc:
                    stats["send_failed"][f"{cat}:{exc.strerror}"] += 1
                if i % 16 == 0:
                    for rs, r in socks:
                        while r and rs.poll(0):
                            reply = rs.recv_multipart()
                            stats["replies"][_describe_reply(reply[0])] += 1
            end = now() + 1.0  # the last replies
            while now() < end:
                for rs, r in socks:
                    while r and rs.poll(0):
                        stats["replies"][_describe_reply(rs.recv_multipart()[0])] += 1
                time.sleep(0.02)
        finally:
            for s, _ in socks:
                s.close(linger=0)
            ctx.term()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    stats["elapsed_s"] = round(now() - t0, 2)
    with open(spec["out"], "w") as fh:
        json.dump(stats, fh)
    return 0


def _describe_reply(header: bytes) -> str:
    import msgpack
    try:
        h = msgpack.unpackb(header, raw=False)
        if h.get("k") == ERROR:
            return f"ERROR: {str(h.get('message'))[:50]}"
        return f"kind {h.get('k')}"
    except Exception:  # noqa: BLE001
        return "undecodable"


# ---------------------------------------------------------------------- the benchmark


def tiny(x: int) -> int:
    return x * 2 + 1


def timed_map(client: Any, m: int, chunksize: int, timeout: float) -> tuple[float, bool]:
    """Seconds for one map of ``m`` tiny tasks, and whether every result was right."""
    t = time.perf_counter()
    got = list(client.map(tiny, range(m), chunksize=chunksize, timeout=timeout))
    dt = time.perf_counter() - t
    return dt, got == [x * 2 + 1 for x in range(m)]


def wait_backlog(cluster: Any, limit: float) -> float | None:
    """Seconds until the broker's bad-message counters stand still for 1 s (None: not within ``limit``)."""
    t0 = now()
    last = None
    still_since = now()
    while now() - t0 < limit:
        try:
            c = cluster.status(5.0)["counters"]
        except Exception:  # noqa: BLE001 - busy or dead; the caller looks at the process
            time.sleep(0.2)
            continue
        seen = sum(v for k, v in c.items() if k.startswith(("protocol_errors", "unknown_", "handshakes_failed")))
        if seen != last:
            last, still_since = seen, now()
        elif now() - still_since >= 1.0:
            return round(still_since - t0, 2)
        time.sleep(0.1)
    return None


def probe_costly(cluster: Any, broker: Any, quick: bool, insecure: bool) -> list[dict[str, Any]]:
    """One costly message at a time on a quiet cluster: how long it holds the broker's loop.

    Sent with the credentials of the role each socket serves (none on an
    insecure cluster): the peer is authenticated. Meanwhile a connection of
    its own asks the broker for its status every 10 ms (_cluster.StallWatch);
    the longest round trip is how long the broker answered nobody (agents'
    heartbeats included).
    """
    import zmq

    from zpar import security

    rng = random.Random(7)
    ctx = zmq.Context.instance()
    rows = []
    creds = {role: security.client_credentials(role, insecure=insecure) for role in ("producer", "agent")}
    for target in (["frontend"] if quick else ["frontend", "backend", "collector"]):
        for cat in SPECIAL:
            s = ctx.socket(zmq.PUSH if target == "collector" else zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            security.apply_client(s, creds["producer" if target == "frontend" else "agent"])
            s.connect(getattr(cluster, target))
            frames = make_message(cat, rng, target)
            time.sleep(0.5)
            before = cluster.status(5.0)["counters"]
            watch = StallWatch(cluster.frontend, creds["producer"])
            watch.start()
            watch.started.wait(5)
            time.sleep(0.1)
            cpu0 = sum(broker.cpu_times()[:2])
            s.send_multipart(frames)
            time.sleep(1.5)
            watch.stop()
            s.close()
            worst = watch.worst()
            if cluster.broker.poll() is not None:  # a finding, not a benchmark failure: said, and the probe ends
                rows.append({"target": target, "category": cat, "frames": len(frames),
                             "bytes": sum(len(f) for f in frames), "broker_died": cluster.broker.returncode,
                             "max_status_rtt_ms": None if worst is None else round(worst * 1000, 1)})
                return rows
            cpu = sum(broker.cpu_times()[:2]) - cpu0
            after = cluster.status(5.0)["counters"]
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("agents_silent", "producers_silent",
                                                                      "protocol_errors")}
            rows.append({"target": target, "category": cat, "frames": len(frames),
                         "bytes": sum(len(f) for f in frames),
                         "max_status_rtt_ms": None if worst is None else round(worst * 1000, 1),
                         "broker_cpu_ms": round(cpu * 1000), "counters": delta})
    return rows


def launch_attackers(args: argparse.Namespace, workdir: str, case: str, addresses: dict[str, str], duration: float,
                     hard: float, tag: str) -> list[tuple[str, subprocess.Popen, str]]:
    """The attacker processes of ``case``, aimed at ``addresses`` (frontend, backend, collector)."""
    from zpar import security
    from zpar.config import BrokerConfig

    insecure = case == "insecure"
    ports = {name: int(address.rsplit(":", 1)[1]) for name, address in addresses.items()}
    n = args.messages
    # an authenticated attacker's garbage goes through its handshake: no raw TCP in that case
    n_raw = 0 if args.no_raw or case == "auth" else max(3, int(n * 0.06))
    n_zmq = n - n_raw
    split = {"frontend": int(n_zmq * 0.4), "backend": int(n_zmq * 0.3)}
    split["collector"] = n_zmq - split["frontend"] - split["backend"]
    specials = args.specials if args.specials is not None else (3 if args.quick else 10)
    held = 10 if args.quick else 30
    keys = {role: security.client_credentials(role, insecure=insecure) for role in ("producer", "agent")}
    attackers = []
    for i, role in enumerate(["frontend", "backend", "collector", *([] if n_raw == 0 else ["raw"])]):
        spec: dict[str, Any] = {
            "role": role, "seed": args.seed + i, "duration": duration, "hard_stop": hard,
            "categories": args.categories.split(",") if args.categories else None,
            "out": os.path.join(workdir, f"{tag}-{role}.json"), "specials": specials,
            "max_message_size": BrokerConfig().max_message_size,
            # refused at the handshake, a socket never connects: do not wait 2 s on each send
            "sndtimeo": 0 if case == "unauth" else 2000}
        own = keys["producer" if role == "frontend" else "agent"]
        if case == "auth" and own is not None:  # this user's keys: written to our 0700 work directory
            spec["curve"] = {"public": own.own.public.decode(), "secret": own.own.secret.decode(),
                             "server": own.broker.public.decode()}
        elif case == "unauth" and own is not None:  # only the broker's public key
            spec["server_key"] = own.broker.public.decode()
            spec["reconnect_every"] = args.reconnect_every
        if role == "raw":
            spec.update(messages=n_raw, held_per_port=held,
                        ports={"frontend": (ports["frontend"], "DEALER"), "backend": (ports["backend"], "DEALER"),
                               "collector": (ports["collector"], "PUSH")})
        else:
            spec.update(messages=split[role], address=addresses[role])
        spec_path = os.path.join(workdir, f"{tag}-{role}.spec.json")
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        with open(os.path.join(workdir, f"{tag}-{role}.err"), "w") as err:  # the child keeps its copy
            proc = subprocess.Popen([*niced(args.attacker_nice), sys.executable, os.path.abspath(__file__),
                                     "--attacker", spec_path], stdout=subprocess.DEVNULL, stderr=err)
        attackers.append((role, proc, spec["out"]))
    return attackers


def maps_under(attackers: list[tuple[str, subprocess.Popen, str]], client: Any, args: argparse.Namespace,
               t_end: float, rep_timeout: float) -> tuple[list[dict[str, Any]], list[str], int]:
    """The good producer's maps, again and again, while ``attackers`` run (at least 3): runs, errors, wrong ones."""
    reps: list[dict[str, Any]] = []
    errors: list[str] = []
    wrong = 0
    while now() < t_end:
        running = any(p.poll() is None for _, p, _ in attackers)
        if (len(reps) >= 3 and not running) or len(reps) >= args.max_reps:
            break
        try:
            dt, ok = timed_map(client, args.map_tasks, args.chunksize, max(10.0, min(rep_timeout, t_end - now())))
        except Exception as exc:  # noqa: BLE001 - a timeout or an error under attack is a finding
            errors.append(f"{type(exc).__name__}: {exc}")
            break
        ended_during = any(p.poll() is None for _, p, _ in attackers)
        reps.append({"s": round(dt, 3), "right": ok, "during_attack": running,
                     "ended_after_attack": running and not ended_during})
        wrong += not ok
    return reps, errors, wrong


def wait_attackers(attackers: list[tuple[str, subprocess.Popen, str]], hard: float, t_end: float) -> None:
    for _, proc, _ in attackers:  # the attackers end by themselves; the hard stop is theirs
        try:
            proc.wait(max(1.0, min(hard, t_end - now())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def read_stats(attackers: list[tuple[str, subprocess.Popen, str]]) -> dict[str, dict[str, Any]]:
    stats = {}
    for role, proc, path in attackers:
        try:
            with open(path) as fh:
                stats[role] = json.load(fh)
        except OSError:
            stats[role] = {"missing": f"exit code {proc.returncode}"}
    return stats


def niced(level: int) -> list[str]:
    """The command prefix that runs a process at this nice level (none for 0)."""
    return ["nice", "-n", str(level)] if level else []


def start_sink(workdir: str, case: str, nice: int = 0) -> tuple[subprocess.Popen, dict[str, str]]:
    """A process with the broker's three sockets that reads every message and drops it: the control of
    ``--control``. Plaintext for ``insecure``; the broker's CurveZMQ keys otherwise, admitting anyone
    (``auth``) or, for ``unauth``, refusing every handshake (ZAP enforced, no handler) after its
    cryptography, as the broker does. Returns it and its addresses."""
    path = os.path.join(workdir, "sink.json")
    proc = subprocess.Popen([*niced(nice), sys.executable, os.path.abspath(__file__), "--sink", path,
                             "--sink-case", case], stdout=subprocess.DEVNULL)
    end = now() + 20
    while now() < end and not os.path.exists(path):
        time.sleep(0.05)
    with open(path) as fh:
        return proc, json.load(fh)


def sink_main(path: str, case: str) -> int:
    import signal

    import zmq

    from zpar import security

    ctx = zmq.Context()
    creds = security.broker_credentials(insecure=case == "insecure")
    socks = {}
    for name, kind in (("frontend", zmq.ROUTER), ("backend", zmq.ROUTER), ("collector", zmq.PULL)):
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if creds is not None:
            s.curve_server = True
            s.curve_secretkey = creds.keys[name].secret
            s.curve_publickey = creds.keys[name].public
            if case == "unauth":  # no ZAP handler in this process: every handshake fails
                s.setsockopt_string(zmq.ZAP_DOMAIN, "zpar-bench-sink")
                s.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        s.bind("tcp://127.0.0.1:0")
        socks[name] = s
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(path + ".tmp", "w") as fh:
        json.dump({name: s.getsockopt_string(zmq.LAST_ENDPOINT) for name, s in socks.items()}, fh)
    os.rename(path + ".tmp", path)
    poller = zmq.Poller()
    for s in socks.values():
        poller.register(s, zmq.POLLIN)
    end = now() + 600
    while not stop and now() < end:
        for s, _ in poller.poll(100):
            for _ in range(256):
                try:
                    s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
    return 0


def run(args: argparse.Namespace, workdir: str, case: str) -> dict[str, Any]:
    """One case (see CASES) on a fresh cluster."""
    insecure = case == "insecure"
    out: dict[str, Any] = {"case": case, "messages": args.messages, "map_tasks": args.map_tasks,
                           "chunksize": args.chunksize, "liveness_window_s": args.heartbeat * 3}
    log_path = os.path.join(workdir, "cluster.log")
    out["log"] = log_path
    cluster = None
    attackers: list[tuple[str, subprocess.Popen, str]] = []
    watch = None
    t_end = now() + args.deadline
    try:
        cluster = start_cluster(log_path, agents=1, workers=2, heartbeat=args.heartbeat, log_level=args.log_level,
                                insecure=insecure)
        broker = psutil.Process(cluster.broker.pid)
        phase = {"phase": "start"}  # of the run, in each RSS sample
        watch = RssWatch(lambda: {"broker": [broker.pid]}, extra=phase.copy)
        watch.start()
        client = cluster.client()
        rep_timeout = max(30.0, min(120.0, t_end - now()))
        timed_map(client, min(5000, args.map_tasks), args.chunksize, rep_timeout)  # warm-up

        # -- baseline
        phase["phase"] = "baseline"
        base_times, wrong = [], 0
        cpu0 = sum(broker.cpu_times()[:2])
        for _ in range(3):
            dt, ok = timed_map(client, args.map_tasks, args.chunksize, rep_timeout)
            base_times.append(dt)
            wrong += not ok
        out["broker_cpu_baseline_s"] = round(sum(broker.cpu_times()[:2]) - cpu0, 2)
        out["baseline_s"] = [round(x, 3) for x in base_times]
        out["baseline_tps"] = args.map_tasks / min(base_times)
        out["baseline_tps_median"] = args.map_tasks / statistics.median(base_times)
        time.sleep(0.5)
        out["rss_before"] = broker.memory_info().rss
        out["fds_before"] = broker.num_fds()
        out["threads_before"] = broker.num_threads()
        before = cluster.status(5.0)["counters"]

        # -- attack
        duration = 0.0 if args.flood else (args.attack_seconds or args.messages / args.rate)
        out["attack_paced_over_s"] = round(duration, 1)
        hard = max(60.0, duration * 3 + 30)
        addresses = {name: getattr(cluster, name) for name in ("frontend", "backend", "collector")}
        if args.control:
            # the same attack at a sink that reads and drops everything (its own process): what the attackers
            # take from the machine alone, whatever the broker does
            phase["phase"] = "control"
            sink, sink_addresses = start_sink(workdir, case, args.attacker_nice)
            try:
                control = launch_attackers(args, workdir, case, sink_addresses, duration, hard, "control")
                attackers.extend(control)
                creps, cerrors, cwrong = maps_under(control, client, args, t_end, rep_timeout)
                wait_attackers(control, hard, t_end)
            finally:
                sink.terminate()
                sink.wait(10)
            wrong += cwrong
            cunder = [r["s"] for r in creps if r["during_attack"]]
            out["control_reps"] = creps
            out["control_errors"] = cerrors
            out["control_tps_median"] = args.map_tasks / statistics.median(cunder) if cunder else 0.0
            out["control_ratio"] = out["control_tps_median"] / out["baseline_tps_median"]
            cstats = read_stats(control)
            out["control_attackers_cpu_s"] = round(sum(st.get("cpu_s", 0) for st in cstats.values()), 2)
        phase["phase"] = "attack"
        launched = launch_attackers(args, workdir, case, addresses, duration, hard, "attack")
        attackers.extend(launched)
        t_attack = now()
        cpu0 = sum(broker.cpu_times()[:2])
        reps, rep_errors, w = maps_under(launched, client, args, t_end, rep_timeout)
        wrong += w
        out["broker_cpu_attack_s"] = round(sum(broker.cpu_times()[:2]) - cpu0, 2)
        # broker CPU beyond what the good maps cost alone, per bad message it read
        expected_cpu = out["broker_cpu_baseline_s"] / 3 * len(reps)
        out["attack_reps"] = reps
        out["attack_rep_errors"] = rep_errors
        wait_attackers(launched, hard, t_end)
        out["attack_s"] = round(now() - t_attack, 2)
        phase["phase"] = "after"
        stats = read_stats(launched)
        out["attackers"] = stats
        out["sent_total"] = sum(sum(s.get("sent", {}).values()) for s in stats.values())
        out["attempted_total"] = out["sent_total"] + sum(sum(s.get("send_failed", {}).values())
                                                         for s in stats.values())
        under = [r["s"] for r in reps if r["during_attack"]]
        out["attack_tps"] = args.map_tasks / min(under) if under else 0.0
        out["attack_tps_median"] = args.map_tasks / statistics.median(under) if under else 0.0
        out["reps_under_attack"] = sum(r["during_attack"] for r in reps)
        out["ratio_best"] = out["attack_tps"] / out["baseline_tps"]
        # the bar: typical against typical (the best of a dozen runs under attack flatters it)
        out["ratio"] = out["attack_tps_median"] / out["baseline_tps_median"]

        # -- after: the broker may still be reading what the attackers left queued; wait for it
        out["backlog_drain_s"] = wait_backlog(cluster, min(60.0, max(5.0, t_end - now() - 60)))
        out["broker_alive"] = cluster.broker.poll() is None
        if out["broker_alive"]:
            out["rss_after"] = broker.memory_info().rss
            out["fds_after"] = broker.num_fds()
            out["threads_after"] = broker.num_threads()
            try:
                dt, ok = timed_map(client, args.map_tasks, args.chunksize, max(10.0, min(rep_timeout, t_end - now())))
                out["after_tps"] = args.map_tasks / dt
                wrong += not ok
            except Exception as exc:  # noqa: BLE001
                out["after_error"] = f"{type(exc).__name__}: {exc}"
            status = cluster.status(5.0)
            after = status["counters"]
            out["counters_after"] = after
            out["counters_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
                                     if after.get(k, 0) != before.get(k, 0)}
            bad = sum(v for k, v in out["counters_delta"].items()
                      if k in ("protocol_errors", "unknown_agent_messages", "unknown_producer_messages",
                               "handshakes_failed"))
            out["bad_messages_read"] = bad
            out["broker_cpu_per_bad_message_us"] = (round((out["broker_cpu_attack_s"] - expected_cpu) / bad * 1e6, 1)
                                                    if bad else None)
            out["status_after"] = {k: status[k] for k in ("workers", "producers", "queued", "running")}
            out["status_after"]["nodes"] = [nd["name"] for nd in status["nodes"]]
        else:
            out["broker_returncode"] = cluster.broker.returncode
        if out["broker_alive"] and args.probe and case != "unauth":  # an unauthenticated peer reads nothing
            phase["phase"] = "probe"
            out["probe"] = probe_costly(cluster, broker, args.quick, insecure)
            out["broker_alive"] = cluster.broker.poll() is None
            if not out["broker_alive"]:
                out["broker_returncode"] = cluster.broker.returncode
                out["broker_died_in"] = "probe"
            out["counters_after_probe"] = cluster.status(5.0)["counters"] if out["broker_alive"] else None
            if out["broker_alive"]:
                out["rss_end"] = broker.memory_info().rss
        out["rss_peak_attack"] = watch.peak("broker", phase="attack")
        out["rss_peak"] = watch.peak("broker")
        out["wrong_maps"] = wrong
    except Exception as exc:  # noqa: BLE001
        out["broken"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    finally:
        for _, proc, _ in attackers:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if watch is not None:
            watch.stop(2)
            step = max(1, len(watch.samples) // 400)
            out["rss_samples"] = watch.samples[::step]
        if cluster is not None:
            if cluster.broker is not None and "broker_alive" not in out:
                out["broker_alive"] = cluster.broker.poll() is None
            stop_cluster(cluster, out)
        out["log_summary"] = summarize_log(log_path, 60)
    return out


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f} MiB"


def verdicts(r: dict[str, Any], bar: float) -> list[tuple[str, bool, str]]:
    if "broken" in r:
        return [("benchmark ran", False, r["broken"])]
    died = next((p for p in r.get("probe") or [] if "broker_died" in p), None)
    v = [("broker alive at the end", bool(r.get("broker_alive")),
          str(r.get("broker_alive")) if died is None else
          f"died in the probe: one {died['category']} message on a new {died['target']} connection")]
    v.append((f"median throughput under attack / alone >= {bar:g}", r.get("ratio", 0) >= bar,
              f"{r.get('ratio', 0):.3f} ({r.get('reps_under_attack', 0)} runs under attack)"))
    v.append(("all results right", r.get("wrong_maps", 1) == 0 and not r.get("attack_rep_errors")
              and "after_error" not in r,
              (f"{r.get('wrong_maps')} wrong maps, "
               f"errors {r.get('attack_rep_errors') or r.get('after_error') or 'none'}")))
    v.append(("no traceback in the cluster log", r["log_summary"].get("tracebacks", 0) == 0,
              str(r["log_summary"].get("tracebacks", 0))))
    sent, asked = r.get("sent_total", 0), r["messages"]
    bad = r.get("counters_delta", {})
    if r.get("case") == "unauth":  # the attackers lack the secret: their sockets never get past the handshake
        tried = r.get("attempted_total", 0)
        v.append(("the attack was attempted", tried >= 0.95 * asked, f"{tried:,} of {asked:,} ({sent:,} queued)"))
        v.append(("refused at the handshake, none read", bad.get("handshakes_failed", 0) > 0
                  and bad.get("protocol_errors", 0) == 0,
                  (f"{bad.get('handshakes_failed', 0):,} handshakes failed ({bad.get('auth_refused', 0):,} of "
                   f"them refused by ZAP), {bad.get('protocol_errors', 0)} bad messages read")))
    else:
        v.append(("the attack was sent", sent >= 0.95 * asked, f"{sent:,} of {asked:,}"))
        if r.get("case") == "auth":
            v.append(("read by the broker and refused", bad.get("protocol_errors", 0) > 0,
                      (f"{bad.get('protocol_errors', 0):,} protocol errors, "
                       f"{bad.get('handshakes_failed', 0)} handshakes failed")))
    return v


def print_report(r: dict[str, Any], bar: float) -> bool:
    if "broken" in r:
        print(f"BROKEN: {r['broken']}\n{r.get('traceback', '')}")
    else:
        print(f"\nwell-behaved producer: list(client.map(tiny, range({r['map_tasks']:,}), chunksize={r['chunksize']}))")
        print(f"  alone:        {r['baseline_tps']:>10,.0f} tasks/s  best, {r['baseline_tps_median']:,.0f} median "
              f"(runs {', '.join(map(str, r['baseline_s']))} s)")
        reps = ", ".join(f"{x['s']}{'+' if x.get('ended_after_attack') else ''}{'' if x['during_attack'] else '*'}"
                         for x in r["attack_reps"])
        print(f"  under attack: {r['attack_tps']:>10,.0f} tasks/s  best, {r['attack_tps_median']:,.0f} median "
              f"(runs {reps} s; + = ended after the attack, * = began after it, not counted)")
        if "after_tps" in r:
            print(f"  after:        {r['after_tps']:>10,.0f} tasks/s")
        if "control_ratio" in r:
            print(f"  control:      {r['control_tps_median']:>10,.0f} tasks/s  median, the same attack sent to a sink "
                  f"that drops it (runs {', '.join(str(x['s']) for x in r['control_reps'])} s; attackers' CPU "
                  f"{r['control_attackers_cpu_s']} s): ratio {r['control_ratio']:.3f}, the machine's share of the loss")
        print(f"  ratio of medians {r['ratio']:.3f} (of bests {r['ratio_best']:.3f}); broker CPU "
              f"{r['broker_cpu_baseline_s']} s over the 3 runs alone, {r['broker_cpu_attack_s']} s over the "
              f"{len(r['attack_reps'])} under attack: the extra is {r.get('broker_cpu_per_bad_message_us')} us per bad "
              f"message read ({r.get('bad_messages_read')}; costly ones and reconnects included)")
        cpu = sum(s.get("cpu_s", 0) for s in r["attackers"].values())
        print(f"  the attackers used {cpu:.1f} s of CPU over {r['attack_s']} s ({os.cpu_count() or 1} cores here)")
        drain = r.get("backlog_drain_s")
        print(f"attack: {r['sent_total']:,} messages sent in {r['attack_s']} s (paced over "
              f"{r['attack_paced_over_s']} s; 0 = flood); the broker was still reading them "
              f"{'over 60' if drain is None else drain} s after the attackers were done")
        for role, s in r["attackers"].items():
            if "missing" in s:
                print(f"  {role}: no report ({s['missing']})")
                continue
            sent = collections.Counter(s.get("sent", {}))
            if role == "raw":
                by = collections.Counter()
                for k, c in sent.items():
                    by[k.split(":", 1)[1]] += c
                print(f"  raw TCP: {sum(sent.values()):,} connections ({dict(by)}); cpu {s['cpu_s']} s; "
                      f"errors {dict(collections.Counter(s.get('raw_errors', {})).most_common(4))}")
            else:
                print(f"  {role}: {sum(sent.values()):,} sent {dict(sent)}; cpu {s['cpu_s']} s"
                      + (f"; {s['connections']:,} new connections" if s.get("connections") else ""))
                if s.get("send_failed"):
                    print(f"    send failed: {s['send_failed']}")
                if s.get("replies"):
                    print(f"    replies: {dict(collections.Counter(s['replies']).most_common(6))}")
        print(f"broker RSS: before {mib(r['rss_before'])}, peak during attack {mib(r.get('rss_peak_attack'))}, "
              f"after {mib(r.get('rss_after'))}, at the end {mib(r.get('rss_end'))}; "
              f"fds {r['fds_before']} -> {r.get('fds_after')}, "
              f"threads {r['threads_before']} -> {r.get('threads_after')}")
        print(f"broker counters, change over the attack: {r.get('counters_delta')}")
        print(f"status after: {r.get('status_after')}")
        if r.get("client_log"):
            print("producer-side zpar log records during the run:")
            for k, c in r["client_log"][:6]:
                print(f"  {c:>7,} x {k}")
        if r.get("probe"):
            print("one costly message at a time, quiet cluster (status asked every 10 ms; heartbeat x liveness "
                  f"= {r['liveness_window_s']:g} s):")
            for p in r["probe"]:
                if "broker_died" in p:
                    print(f"  {p['target']:<9} {p['category']:<18} {p['frames']:>7,} frames: THE BROKER DIED "
                          f"(exit code {p['broker_died']}; its traceback is in the cluster log)")
                    continue
                print(f"  {p['target']:<9} {p['category']:<18} {p['frames']:>7,} frames {p['bytes'] / 2**20:6.1f} MiB: "
                      f"broker unresponsive up to {p['max_status_rtt_ms']:7.1f} ms, "
                      f"broker CPU {p['broker_cpu_ms']:5d} ms; "
                      f"{ {k: v for k, v in p['counters'].items() if v} }")
    ls = r.get("log_summary", {})
    print(f"cluster log: {ls.get('lines', 0):,} lines, {ls.get('bytes', 0) / 2**20:.1f} MiB, "
          f"{ls.get('tracebacks', 0)} tracebacks ({r.get('log')})")
    for k, c in ls.get("top", [])[:8]:
        print(f"  {c:>7,} x {k}")
    for tb in ls.get("first_tracebacks", []):
        print(tb)
    if r.get("leaked"):
        print(f"LEAKED processes after stop (killed): {r['leaked']}")
    return print_verdicts(verdicts(r, bar))


def print_summary(results: dict[str, dict[str, Any]], bar: float) -> None:
    print(f"\nsummary (bar: median under attack / median alone >= {bar:g}):")
    print(f"  {'case':<10}{'alone':>12}{'under attack':>14}{'ratio':>8}{'(bests)':>9}{'control':>9}  broker RSS "
          "before -> peak, worst probe stall")
    for case, r in results.items():
        if "broken" in r:
            print(f"  {case:<10} BROKEN: {r['broken']}")
            continue
        probe = max((p["max_status_rtt_ms"] or 0 for p in r.get("probe") or [] if "broker_died" not in p),
                    default=None)
        control = f"{r['control_ratio']:.3f}" if "control_ratio" in r else "-"
        print(f"  {case:<10}{r['baseline_tps_median']:>12,.0f}{r['attack_tps_median']:>14,.0f}{r['ratio']:>8.3f}"
              f"{r['ratio_best']:>9.3f}{control:>9}  {mib(r['rss_before'])} -> {mib(r.get('rss_peak'))}, "
              f"{'-' if probe is None else f'{probe:.0f} ms'}  [{'PASS' if r['ratio'] >= bar else 'FAIL'}]"
              + ("" if r.get("broker_alive") else
                 "  BROKER DIED" + (" in the probe" if r.get("broker_died_in") else "")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 messages, 20,000-task maps")
    ap.add_argument("--messages", type=int, help="malformed messages (default 100,000; 10,000 with --quick)")
    ap.add_argument("--map-tasks", type=int, help="tasks per map (default 50,000; 20,000 with --quick)")
    ap.add_argument("--chunksize", type=int, default=1, help="the good producer's map chunksize (1)")
    ap.add_argument("--rate", type=float, default=5000.0,
                    help="malformed messages per second, all attackers together (default 5,000)")
    ap.add_argument("--attack-seconds", type=float, help="spread the attack over this long instead")
    ap.add_argument("--flood", action="store_true", help="send the attack as fast as possible")
    ap.add_argument("--specials", type=int, help="how many of each costly message (200,000 frames, a header "
                    "over MAX_HEADER_BYTES, a MAX_ENTRIES-entry header, a header of empty maps) per attacker "
                    "(default 10; 3 with --quick)")
    ap.add_argument("--categories", help="only these message categories (comma list; default all): "
                    + ", ".join([*WEIGHTS, *SPECIAL]))
    ap.add_argument("--no-raw", action="store_true", help="no raw TCP attacker")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="skip timing one costly message at a time after the attack")
    ap.add_argument("--max-reps", type=int, default=60, help="most maps run under attack")
    ap.add_argument("--heartbeat", type=float, default=0.1, help="cluster heartbeat (LocalCluster's 0.1 s)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma list of: " + "; ".join(f"{k}: {v}" for k, v in CASES.items()) + " (default all)")
    ap.add_argument("--reconnect-every", type=int, default=5,
                    help="unauth: each ZeroMQ attacker socket opens a new connection (a new handshake) every this "
                         "many messages (5); ZeroMQ does not retry a refused handshake by itself")
    ap.add_argument("--secret", action="store_const", const="unauth", dest="cases", help=argparse.SUPPRESS)
    ap.add_argument("--log-level", default="WARNING", help="of the broker and agent (their log goes to a file)")
    ap.add_argument("--deadline", type=float, help="seconds for each case (default 300; 150 with --quick)")
    ap.add_argument("--bar", type=float, default=0.8, help="throughput ratio bar (0.8)")
    ap.add_argument("--attacker-nice", type=int, default=0, metavar="N",
                    help="run the attackers (and the control's sink) at this nice level: on a machine the "
                         "attackers share with the cluster, what the broker's handling costs the good producer, "
                         "without the CPU the attackers take by themselves (0: same priority)")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--keep-logs", action="store_true", help="keep the cluster log (kept anyway on failure)")
    ap.add_argument("--control", action="store_true",
                    help="first, the same attack at a sink process that reads and drops everything (in unauth: "
                         "refuses every handshake): the throughput ratio then is what the attackers take from the "
                         "machine alone")
    ap.add_argument("--attacker", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--sink", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--sink-case", default="insecure", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.attacker:
        return attacker_main(args.attacker)
    if args.sink:
        return sink_main(args.sink, args.sink_case)
    args.messages = args.messages or (10_000 if args.quick else 100_000)
    args.map_tasks = args.map_tasks or (20_000 if args.quick else 50_000)
    args.deadline = args.deadline or (150.0 if args.quick else 300.0)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in CASES for c in cases):
        ap.error(f"--cases takes a comma list of {', '.join(CASES)}, not {args.cases!r}")
    from zpar import protocol as P
    drift = {name: (mine, getattr(P, name)) for name, mine in (("MAX_HEADER_BYTES", MAX_HEADER_BYTES),
             ("MAX_FRAMES", MAX_FRAMES), ("MAX_ENTRIES", MAX_ENTRIES)) if mine != getattr(P, name)}
    if drift:
        print(f"bench_garbage's copies of zpar.protocol's limits are out of date (ours, zpar's): {drift}")
        return 2
    private_config_home()  # the default clusters' secret: this user's own, made here, not in the home
    print(f"bench_garbage: {args.messages:,} malformed messages against LocalCluster(agents=1, workers=2, "
          f"heartbeat={args.heartbeat:g}); good producer maps {args.map_tasks:,} tasks, chunksize {args.chunksize}; "
          f"cases {', '.join(cases)}; {psutil.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
    workdir = tempfile.mkdtemp(prefix="zpar-bench-garbage-")
    code = 2
    results: dict[str, dict[str, Any]] = {}
    try:
        codes = []
        for case in cases:
            print(f"\n=== case {case}: {CASES[case]}", flush=True)
            handler = count_zpar_logs(70)
            casedir = os.path.join(workdir, case)
            os.mkdir(casedir)
            r = results[case] = run(args, casedir, case)
            logging.getLogger("zpar").removeHandler(handler)
            r["client_log"] = handler.counts.most_common(10)
            ok = print_report(r, args.bar)
            codes.append(2 if "broken" in r else (0 if ok else 1))
        code = max(codes)
        print_summary(results, args.bar)
    finally:
        code = finish_run(args, workdir, results, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
