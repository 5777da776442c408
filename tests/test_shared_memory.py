"""Large arguments and results through shared memory on the embedded cluster's host (zpar._shm).

Every path that ends a task leaves /dev/shm as it was: done, failed,
cancelled, worker killed, producer killed, client closed. A TCP cluster
still carries them as frames.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import cloudpickle
import numpy as np
import psutil
import pytest
import tasks

import zpar
from zpar import _shm
from zpar.testing import wait_for

pytestmark = [pytest.mark.skipif(not os.path.isdir(_shm.ROOT), reason="no /dev/shm")]

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module

MB = 1 << 20


def mapping_of(array):
    """``(path, writable)`` of the file mapping holding ``array``'s data in this process, else (None, writable)."""
    addr = array.ctypes.data
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return (parts[5].strip() if len(parts) > 5 else None), bool(array.flags.writeable)
    return None, bool(array.flags.writeable)


def add_in_place(array):
    array += 1  # a Pool task may write into its argument: so may ours, without touching the producer's
    return float(array.sum())


def pid_then_block(pid_path, gate, array):
    with open(pid_path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.rename(pid_path + ".tmp", pid_path)
    return tasks.block_until(gate, value=array.nbytes)


def raise_on(array):
    raise ValueError(f"refused {array.nbytes} bytes")


def segments(client) -> list[str]:
    return sorted(os.listdir(client._cluster.shm_dir))


def wait_for_pid(path: str) -> int:
    return int(wait_for(lambda: os.path.exists(path) and open(path).read(), 20, what=f"{path} written"))


@pytest.fixture(scope="module")
def shm_client():
    with zpar.Client(workers=2) as client:
        assert client._cluster.shm_dir and os.path.isdir(client._cluster.shm_dir)
        yield client


@pytest.fixture
def one_worker():
    with zpar.Client(workers=1) as client:
        yield client


# ---------------------------------------------------------------------- values


def test_a_big_array_comes_back_equal(shm_client):
    arr = np.random.default_rng(1).random(20 * MB // 8)
    out = shm_client.submit(tasks.identity, arr).result(timeout=30)
    assert out.dtype == arr.dtype and np.array_equal(out, arr)
    assert segments(shm_client) == []


def test_mixed_buffers_come_back_equal(shm_client):
    value = {"big": np.arange(3 * MB // 4, dtype=np.int32), "medium": np.ones(100_000),  # 800 kB
             "small": np.zeros(10), "bytes": os.urandom(2 * MB), "text": "x" * 100,
             "view": np.arange(4 * MB // 8, dtype=np.float64).reshape(512, -1)[:, ::2]}
    out = shm_client.submit(tasks.identity, value).result(timeout=30)
    assert out.keys() == value.keys() and out["text"] == value["text"] and out["bytes"] == value["bytes"]
    for key in ("big", "medium", "small", "view"):
        assert np.array_equal(out[key], value[key]), key


def test_the_worker_maps_its_argument_and_the_producer_its_result(shm_client):
    arr = np.arange(8 * MB // 8, dtype=np.float64)
    path, writable = shm_client.submit(mapping_of, arr).result(timeout=30)
    assert path is not None and path.startswith(shm_client._cluster.shm_dir + "/"), path  # no copy on the way
    assert writable  # copy-on-write, as a Pool task's argument is its own
    out = shm_client.submit(tasks.identity, arr).result(timeout=30)
    path, writable = mapping_of(out)
    assert path is not None and path.startswith(shm_client._cluster.shm_dir + "/") and path.endswith("(deleted)")
    assert writable
    out[0] = 42.0  # the producer's result is its own


def test_a_task_writing_into_its_argument_leaves_the_producers_copy_alone(shm_client):
    arr = np.zeros(4 * MB // 8)
    futs = [shm_client.submit(add_in_place, arr) for _ in range(3)]  # the same segment's data each time
    assert [f.result(timeout=30) for f in futs] == [float(arr.size)] * 3
    assert not arr.any()


def test_small_buffers_stay_frames(shm_client):
    arr = np.ones(_shm.THRESHOLD // 8 - 1)
    path, _ = shm_client.submit(mapping_of, arr).result(timeout=30)
    assert path is None or not path.startswith(_shm.ROOT), path


# ---------------------------------------------------------------------- every path cleans up


def test_dev_shm_is_clean_after_done_and_failed_tasks(shm_client):
    arr = np.ones(2 * MB // 8)
    futures = [shm_client.submit(tasks.identity, arr) for _ in range(8)]
    assert [f.result(timeout=30).size for f in futures] == [arr.size] * 8
    with pytest.raises(ValueError, match="refused"):
        shm_client.submit(raise_on, arr).result(timeout=30)
    wait_for(lambda: segments(shm_client) == [], 20, what="no segment left")


def test_dev_shm_is_clean_after_a_cancel(one_worker, tmp_path):
    gate = str(tmp_path / "gate")
    arr = np.ones(2 * MB // 8)
    try:
        running = one_worker.submit(pid_then_block, str(tmp_path / "pid"), gate, arr)  # holds the only worker
        wait_for_pid(str(tmp_path / "pid"))
        queued = one_worker.submit(tasks.identity, arr)
        assert len(segments(one_worker)) == 2
        assert queued.cancel()
        wait_for(lambda: len(segments(one_worker)) == 1, 20, what="the queued task's segment removed")
        assert running.cancel()  # not forced: it runs on, and its result is dropped when it comes
    finally:
        open(gate, "w").close()
    # The next task runs after it on the one worker: by its result, the dropped one's came and went.
    assert one_worker.submit(tasks.identity, 7).result(timeout=30) == 7
    wait_for(lambda: segments(one_worker) == [], 20, what="no segment left")


def test_dev_shm_is_clean_after_a_dropped_big_result(one_worker, tmp_path):
    gate = str(tmp_path / "gate")
    try:
        fut = one_worker.submit(tasks.block_until, gate, 30.0, np.ones(3 * MB // 8))  # the result is big too
        assert len(segments(one_worker)) == 1  # made by submit
        assert fut.cancel()
    finally:
        open(gate, "w").close()
    assert one_worker.submit(tasks.identity, 7).result(timeout=30) == 7
    wait_for(lambda: segments(one_worker) == [], 20, what="no segment left")


def test_a_killed_worker_is_replaced_and_the_retry_maps_the_same_argument(one_worker, tmp_path):
    arr = np.arange(4 * MB // 8, dtype=np.float64)
    fut = one_worker.submit(tasks.die_once_then_sum, str(tmp_path / "died"), arr)
    assert fut.result(timeout=30) == float(arr.sum())
    wait_for(lambda: segments(one_worker) == [], 20, what="no segment left")


def test_dev_shm_is_clean_after_a_worker_is_killed_mid_task(one_worker, tmp_path):
    gate = str(tmp_path / "gate")
    try:
        fut = one_worker.options(retries=0).submit(pid_then_block, str(tmp_path / "pid"), gate, np.ones(2 * MB // 8))
        os.kill(wait_for_pid(str(tmp_path / "pid")), signal.SIGKILL)
        with pytest.raises(zpar.WorkerLost):
            fut.result(timeout=30)
    finally:
        open(gate, "w").close()
    wait_for(lambda: segments(one_worker) == [], 20, what="no segment left")


def test_closing_the_client_removes_its_directory(tmp_path):
    gate = str(tmp_path / "gate")
    try:
        client = zpar.Client(workers=1)
        directory = client._cluster.shm_dir
        client.submit(pid_then_block, str(tmp_path / "pid"), gate, np.ones(2 * MB // 8))
        client.submit(tasks.identity, np.ones(2 * MB // 8))
        assert len(os.listdir(directory)) == 2  # made by submit
        client.close()
    finally:
        open(gate, "w").close()
    assert not os.path.exists(directory)


_PRODUCER = textwrap.dedent("""
    import os, sys, numpy as np, zpar
    sys.path.insert(0, {here!r})
    import cloudpickle, test_shared_memory as t
    cloudpickle.register_pickle_by_value(t)
    client = zpar.Client(workers=1)
    client.submit(t.pid_then_block, {pid!r}, {gate!r}, np.ones(2 * t.MB // 8))
    print(client._cluster.shm_dir, client._cluster.procs[0].pid, flush=True)
    sys.stdin.read()
""")


def test_a_killed_producers_segments_are_removed_by_its_hub(tmp_path):
    gate, pid_path = str(tmp_path / "gate"), str(tmp_path / "pid")
    code = _PRODUCER.format(here=os.path.dirname(__file__), pid=pid_path, gate=gate)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        directory, hub_pid = proc.stdout.readline().split()
        hub = psutil.Process(int(hub_pid))
        wait_for_pid(pid_path)  # the task runs: its argument's segment is there
        assert len(os.listdir(directory)) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        hub.wait(20)  # it sees its producer gone, and exits
        assert not os.path.exists(directory)
    finally:
        open(gate, "w").close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_next_client_sweeps_what_dead_producers_left():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = os.path.join(_shm.ROOT, f"zpar-{dead.pid}-0123456789ab")
    os.mkdir(left, 0o700)
    with open(os.path.join(left, f"{dead.pid}-0"), "wb") as fh:
        fh.write(b"x" * 100)
    mine = os.path.join(_shm.ROOT, f"zpar-{os.getpid()}-0123456789ab")  # alive: left alone
    os.mkdir(mine, 0o700)
    try:
        with zpar.Client(workers=1):
            assert not os.path.exists(left)
            assert os.path.exists(mine)
    finally:
        _shm.remove_dir(left)
        _shm.remove_dir(mine)


# ---------------------------------------------------------------------- elsewhere: frames as before


def test_a_tcp_cluster_carries_big_arrays_as_frames(cluster_client):
    arr = np.arange(4 * MB // 8, dtype=np.float64)
    out = cluster_client.submit(tasks.identity, arr).result(timeout=30)
    assert np.array_equal(out, arr)
    path, _ = cluster_client.submit(mapping_of, arr).result(timeout=30)
    assert path is None or not path.startswith(_shm.ROOT), path
    assert cluster_client._shm is None


def test_a_full_dev_shm_falls_back_to_frames(tmp_path):
    space = _shm.Space(str(tmp_path / "missing"), handoff=False)  # no segment can be made there
    from zpar import serialize

    arr = np.arange(2 * MB // 8, dtype=np.float64)
    frames = serialize.dumps(arr, shared=space)
    assert len(frames) == 2 and np.array_equal(serialize.loads(frames), arr)


def test_a_segment_name_outside_zpar_directories_is_refused(tmp_path):
    from zpar import serialize
    from zpar.errors import SerializationError

    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 64)
    space = _shm.Space(str(tmp_path), handoff=True)
    frames = serialize.dumps(np.ones(2 * MB // 8), shared=space)  # a layout naming a file outside /dev/shm
    with pytest.raises(SerializationError, match="not a zpar shared-memory segment"):
        serialize.loads(frames, shared=True)
    serialize.discard(frames)  # refuses it too
    assert victim.exists() and any(p.name != "victim" for p in tmp_path.iterdir())


def test_only_the_embedded_clusters_processes_accept_a_value_naming_a_segment(shm_client, cluster_client):
    # A node of a TCP cluster could send a result naming a segment: the producer refuses it, whatever
    # the name (a value from the embedded cluster's own workers is mapped).
    from zpar import _refs, serialize
    from zpar.errors import SerializationError

    space = _shm.Space(shm_client._cluster.shm_dir, handoff=False)
    arr = np.arange(2 * MB // 8, dtype=np.float64)
    frames = serialize.dumps(arr, shared=space)
    with pytest.raises(SerializationError, match="not on this host's embedded cluster"):
        serialize.loads(frames)
    assert np.array_equal(serialize.loads(frames, shared=True), arr)
    with pytest.raises(SerializationError, match="not on its producer's embedded cluster"):
        _refs.unpack(_refs.pack(arr, space))
    assert shm_client._io.core.shared and not cluster_client._io.core.shared
    serialize.discard(frames)
