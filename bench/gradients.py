"""The two ways of the gradient GEMMs after the backward time loop, timed against each other.

Usage (from the repository root)::

    python bench/gradients.py                       # the shapes behind the CPU threshold
    python bench/gradients.py --shapes 100,64,256,256 --dtype float64

For each ``T,B,I,H`` it times :func:`numlstm.backends.cpu._gradient_gemms` (the weight
gradients split over threads by gate rows) and
:func:`numlstm.backends.cpu._gradient_gemms_packed` (split by rows, each thread's blocks
of rows read once for all products, into partial sums) on the same random arrays,
interleaved, 2 threads, and prints the medians, their ratio and the size of a thread's
partial weight gradients, the quantity that ``PACKED_GRADIENT_MAX_BYTES`` compares.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cpu import limit_threads, pinned_threads

THREADS = 2
#: The shapes (T, B, I, H) measured for ``PACKED_GRADIENT_MAX_BYTES``.
SHAPES = ((50, 16, 32, 64), (100, 32, 64, 128), (100, 32, 128, 256), (100, 64, 256, 256),
          (100, 32, 128, 512), (200, 8, 128, 512), (50, 16, 256, 1024))  # fmt: skip


def measure(shape, dtype, repeats=11):
    """Median milliseconds of the two ways, on the same arrays.

    Parameters
    ----------
    shape : tuple of int
        ``(T, B, I, H)``: ``δa`` is ``(T B) x 4H``.
    dtype : str
        ``float32`` or ``float64``.
    repeats : int
        Timed calls of each, interleaved, after one untimed call.

    Returns
    -------
    dict
        ``by_gates_ms``, ``packed_ms``, ``partial_bytes`` and ``max_difference`` (the largest
        difference between the two results, relative to the largest value of each).
    """
    import numpy as np

    from numlstm.backends import _packed, cpu

    steps, batch, n_inputs, hidden = shape
    rows = steps * batch
    rng = np.random.default_rng(0)
    d_a = rng.standard_normal((rows, 4 * hidden)).astype(dtype)
    inputs = rng.standard_normal((rows, n_inputs)).astype(dtype)
    h_prev = rng.standard_normal((rows, hidden)).astype(dtype)
    w_ih = rng.standard_normal((4 * hidden, n_inputs)).astype(dtype)
    w_ih_packed = _packed.empty_packed(*w_ih.shape, dtype)
    _packed.pack(w_ih, w_ih_packed)
    work = cpu.gradient_work(THREADS, n_inputs, hidden, hidden, dtype)

    def outputs():
        return [
            np.empty((rows, n_inputs), dtype),
            np.empty(w_ih.shape, dtype),
            np.empty((4 * hidden, hidden), dtype),
            np.empty(4 * hidden, dtype),
        ]

    by_gates, by_blocks = outputs(), outputs()
    args = (d_a, inputs, h_prev, w_ih_packed)
    ways = (
        lambda: cpu._gradient_gemms(*args, *by_gates, *work, THREADS),
        lambda: cpu._gradient_gemms_packed(*args, *by_blocks, *work, THREADS),
    )
    times = [[], []]
    for way in ways:
        way()
    for _ in range(repeats):
        for way, spent in zip(ways, times, strict=True):
            start = time.perf_counter()
            way()
            spent.append(time.perf_counter() - start)
    difference = max(
        float(np.abs(a - b).max() / np.abs(a).max())
        for a, b in zip(by_gates, by_blocks, strict=True)
    )
    return {
        "by_gates_ms": 1e3 * statistics.median(times[0]),
        "packed_ms": 1e3 * statistics.median(times[1]),
        "partial_bytes": 4 * hidden * (n_inputs + hidden) * np.dtype(dtype).itemsize,
        "max_difference": difference,
    }


def _shape(text):
    fields = text.split(",")
    if len(fields) != 4 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
        raise argparse.ArgumentTypeError(f"expected four positive integers T,B,I,H, got {text!r}")
    return tuple(int(f) for f in fields)


def main(argv=None):
    """Print both ways' medians for each shape."""
    parser = argparse.ArgumentParser(
        prog="python bench/gradients.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--shapes", nargs="+", type=_shape, help="T,B,I,H (default: SHAPES)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args(argv)
    limit_threads(THREADS)
    from numlstm.backends import cpu

    print(f"{args.dtype}, {THREADS} threads; PACKED_GRADIENT_MAX_BYTES = "
          f"{cpu.PACKED_GRADIENT_MAX_BYTES}")  # fmt: skip
    with pinned_threads(THREADS):
        for shape in args.shapes or SHAPES:
            r = measure(shape, args.dtype)
            print(
                f"T,B,I,H = {','.join(map(str, shape))}: partials "
                f"{r['partial_bytes'] / 2**20:.2f} MiB, by gate rows {r['by_gates_ms']:.3f} ms, "
                f"by rows {r['packed_ms']:.3f} ms (x{r['packed_ms'] / r['by_gates_ms']:.2f}), "
                f"largest difference {r['max_difference']:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
