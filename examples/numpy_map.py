"""A NumPy map: sort each chunk of a large array on a different core.

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

CHUNKS = 8
CHUNK_LEN = 2_000_000  # float64: 16 MB a chunk, 128 MB in all


def sort_chunk(chunk):
    """The work done on each chunk: NumPy's sort runs on one core, so chunks sort in parallel."""
    return np.sort(chunk)


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: start a private cluster
    rng = np.random.default_rng(seed=42)
    data = rng.standard_normal(CHUNKS * CHUNK_LEN)
    chunks = np.split(data, CHUNKS)  # views into `data`: splitting copies nothing

    # What "out of band" means: pickle protocol 5 hands big buffers to a callback
    # instead of copying them into the pickle. zpar sends each one as its own frame.
    buffers = []
    head = pickle.dumps(chunks[0], protocol=5, buffer_callback=buffers.append)
    print(f"one chunk: {chunks[0].nbytes / 1e6:.0f} MB of data -> a {len(head)}-byte pickle "
          f"+ {len(buffers)} buffer of {buffers[0].raw().nbytes / 1e6:.0f} MB (the chunk's own memory, not a copy)")

    start = time.perf_counter()
    expected = [np.sort(c) for c in chunks]
    t_serial = time.perf_counter() - start
    print(f"serial:   {t_serial:.2f} s")

    with zpar.Client(address) as client:
        start = time.perf_counter()
        # map() keeps input order, like the built-in map; each chunk is one task.
        results = list(client.map(sort_chunk, chunks))
        t_parallel = time.perf_counter() - start
    mb = 2 * data.nbytes / 1e6  # every chunk goes out and comes back
    print(f"parallel: {t_parallel:.2f} s  (speed-up {t_serial / t_parallel:.2f}x, {mb / t_parallel:,.0f} MB/s moved)")

    # A result is an ordinary ndarray, built over the received frame's memory.
    first = results[0]
    print(f"result: {type(first).__name__} {first.dtype} shape {first.shape}, "
          f"owns its data: {first.flags.owndata}, writeable: {first.flags.writeable}")

    for i, (got, want) in enumerate(zip(results, expected)):
        assert np.array_equal(got, want), f"chunk {i} differs"
    print(f"all {CHUNKS} chunks sorted correctly")
