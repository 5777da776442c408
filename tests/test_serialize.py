"""Values on the wire: chunked large buffers come back whole, writable and equal."""

from __future__ import annotations

import numpy as np
import pytest

from zpar import serialize


@pytest.mark.parametrize("chunk", [False, True])
def test_large_buffers_round_trip_whole_with_or_without_chunks(chunk):
    big = np.random.default_rng(7).random((5 << 20) // 8)  # 5 MiB: five chunks and a bit
    raw = bytes(range(256)) * (12 << 10)  # 3 MiB of bytes
    frames = serialize.dumps({"a": big, "b": raw, "c": np.arange(10)}, chunk=chunk)
    if chunk:
        assert len(frames) > 6 and max(memoryview(f).nbytes for f in frames[1:]) <= serialize.CHUNK_BYTES
    else:
        assert len(frames) == 3
    back = serialize.loads(frames)
    assert np.array_equal(back["a"], big) and back["a"].flags.writeable
    assert back["b"] == raw and type(back["b"]) is bytes
    assert list(back["c"]) == list(range(10))


def test_a_chunked_value_that_lost_a_frame_is_an_error_not_a_wrong_value():
    frames = serialize.dumps(np.zeros(1 << 20), chunk=True)
    with pytest.raises(serialize.SerializationError, match="declares"):
        serialize.loads(frames[:-1])
