"""A NumPy map: smooth many long signals, one signal per task, on every core.

Large NumPy arrays travel between the producer and the workers as pickle-5
"out-of-band" buffers: the pickle holds only a small description (dtype,
shape), and the array's memory goes to ZeroMQ as a frame of its own, with no
extra copy on either side. This example shows that, then checks every result.

    python examples/numpy_map.py                      # a private cluster on this machine
    python examples/numpy_map.py tcp://127.0.0.1:5555 # a running zpar-broker
"""

import pickle
import sys
import time

import numpy as np

import zpar

SIGNALS = 8            # rows: one task each
SAMPLES = 1_000_000    # float64: 8 MB a row, 64 MB in all
WINDOW = np.ones(1001) / 1001  # a moving average over 1001 samples


def smooth(signal):
    """The work done on one row. np.convolve runs on one core, so rows smooth in parallel."""
    return np.convolve(signal, WINDOW, mode="same")  # WINDOW travels with the function


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: start a private cluster
    signals = np.random.default_rng(seed=42).standard_normal((SIGNALS, SAMPLES))

    # What "out of band" means: pickle protocol 5 hands big buffers to a callback
    # instead of copying them into the pickle. zpar sends each one as its own frame.
    buffers = []
    head = pickle.dumps(signals[0], protocol=5, buffer_callback=buffers.append)
    print(f"one row: {signals[0].nbytes / 1e6:.0f} MB -> a {len(head)}-byte pickle + "
          f"{len(buffers)} buffer of {buffers[0].raw().nbytes / 1e6:.0f} MB (the row's own memory, not a copy)")

    start = time.perf_counter()
    expected = [smooth(row) for row in signals]
    t_serial = time.perf_counter() - start
    print(f"serial:   {t_serial:.2f} s")

    with zpar.Client(address) as client:
        workers = client.wait_for_workers()  # the cluster's worker processes take a moment to start
        start = time.perf_counter()
        # map() keeps input order, like the built-in map. Iterating a 2-D array
        # yields its rows: each row is one task.
        results = list(client.map(smooth, signals))
        t_parallel = time.perf_counter() - start
    print(f"parallel: {t_parallel:.2f} s on {workers} workers (speed-up {t_serial / t_parallel:.2f}x; "
          f"{2 * signals.nbytes / 1e6:.0f} MB went out and came back)")

    # A result is an ordinary ndarray, built over the memory of the frame it came in.
    first = results[0]
    print(f"result: {type(first).__name__} {first.dtype} {first.shape}, owns its memory: "
          f"{first.flags.owndata}, writeable: {first.flags.writeable}")

    for i, (got, want) in enumerate(zip(results, expected, strict=True)):  # a missing row fails too
        assert np.array_equal(got, want), f"row {i} differs"
    print(f"all {SIGNALS} rows match the serial results")
