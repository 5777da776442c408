"""zpar.pprocess's persistent and background calls, and its other forks: as pprocess makes them, on this machine.

A persistent call runs in a background process listening on a socket file;
whoever connects later collects what it sends, each message acknowledged.
Background processes forked here are this test process's children, so the
leak check sees them end (the last test of a kind reaps them with waitall).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zpar import pprocess


@pytest.fixture(autouse=True)
def default_layer():
    pprocess.use()
    yield
    pprocess.waitall()
    pprocess.shutdown()


def triple(x):
    return 3 * x


def crunch(n):
    """A background call's work that runs on zpar: a Queue of its own (the background process's pool)."""
    queue = pprocess.Queue(limit=2)
    calc = queue.manage(pprocess.MakeParallel(triple))
    for i in range(n):
        calc(i)
    return sorted(queue)


def test_a_background_call_is_collected_by_another_process(tmp_path):
    address = str(tmp_path / "task.socket")
    pprocess.BackgroundCallable(address, pprocess.MakeParallel(crunch))(5)
    collector = ("import sys, zpar.pprocess as pprocess\n"
                 "print(list(pprocess.BackgroundQueue(sys.argv[1])))\n")
    out = subprocess.run([sys.executable, "-c", collector, address], capture_output=True, text=True, timeout=50,
                         check=True)
    assert out.stdout == "[[0, 3, 6, 9, 12]]\n"
    pprocess.waitall()  # it ended once its result was taken, and removed its socket file
    assert not os.path.exists(address)


def test_a_persistent_exchange_collects_the_calls_it_started(tmp_path):
    class Collect(pprocess.PersistentExchange):
        def store_data(self, channel):
            self.got.append(channel.receive())

    starter = Collect(limit=1)
    for i in range(2):
        starter.manage(str(tmp_path / f"{i}.socket"), pprocess.MakeParallel(triple))(i + 1)
    assert starter.active() == []  # pprocess's start does not watch what it started: connect() does
    collector = Collect()
    collector.got = []
    for i in range(2):
        collector.connect(str(tmp_path / f"{i}.socket"))
    collector.finish()
    assert sorted(collector.got) == [3, 6]


def test_a_message_goes_to_the_next_reader_if_one_leaves_without_it(tmp_path):
    address = str(tmp_path / "p.socket")
    pprocess.start_persistent(address, lambda channel: channel.send("kept"))
    pprocess.connect_persistent(address).close()  # connects, then leaves without reading
    reader = pprocess.connect_persistent(address)
    assert reader.receive() == "kept"
    with pytest.raises(EOFError):
        reader.receive()


def test_an_exception_in_a_background_call_is_its_last_message(tmp_path):
    address = str(tmp_path / "e.socket")

    def fails(channel):
        channel.send(1)
        raise KeyError("in the background")

    pprocess.start_persistent(address, fails)
    queue = pprocess.BackgroundQueue(address)
    assert next(queue) == 1
    with pytest.raises(KeyError, match="in the background"):
        next(queue)


def test_create_persistent_gives_the_creator_a_channel_to_talk_on(tmp_path):
    channel = pprocess.create_persistent(str(tmp_path / "c.socket"))
    if channel.pid == 0:
        try:
            channel.send(channel.receive() * 2)
        finally:
            pprocess.exit(channel)
    assert channel.pid > 0
    channel.send(21)
    assert channel.receive() == 42
    channel.close()
    channel.wait()


def test_a_message_instead_of_a_receipt_raises_acknowledgement_error(tmp_path):
    channel = pprocess.create_persistent(str(tmp_path / "a.socket"))
    if channel.pid == 0:
        try:
            try:
                channel.send("from the child")  # crosses the parent's message
            except pprocess.AcknowledgementError:
                channel.receive()
        finally:
            pprocess.exit(channel)
    with pytest.raises(pprocess.AcknowledgementError, match="instead of its receipt"):
        channel.send("from the parent")
    assert channel.receive() == "from the child"  # kept, not lost
    channel.close()
    channel.wait()


def test_close_streams_sends_a_childs_output_nowhere():
    program = ("import os, zpar.pprocess as pprocess\n"
               "channel = pprocess.create()\n"
               "if channel.pid == 0:\n"
               "    pprocess.close_streams()\n"
               "    print('lost in the child', flush=True)\n"
               "    os.write(2, b'lost too')\n"
               "    channel.send('done')\n"
               "    pprocess.exit(channel)\n"
               "print(channel.receive())\n")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=50, check=True)
    assert (out.stdout, out.stderr) == ("done\n", "")


def test_create_pipes_gives_a_two_way_channel_over_pipes():
    channel = pprocess.create_pipes()
    if channel.pid == 0:
        try:
            while (x := channel.receive()) is not None:
                channel.send(x + 1)
        finally:
            pprocess.exit(channel)
    for i in range(50):
        channel.send(i)
        assert channel.receive() == i + 1
    channel.send(None)
    with pytest.raises(EOFError):
        channel.receive()
    channel.close()
    channel.wait()


def test_output_buffered_before_a_fork_is_written_once(tmp_path):
    program = ("import zpar.pprocess as pprocess\n"
               "print('before the fork')\n"
               "queue = pprocess.Queue()\n"
               "for i in range(3):\n"
               "    channel = queue.create()\n"
               "    if channel:\n"
               "        channel.send(i)\n"
               "        pprocess.exit(channel)\n"
               "print(sorted(queue))\n")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout == "before the fork\n[0, 1, 2]\n"  # a pipe buffers it: the children must not write it again
