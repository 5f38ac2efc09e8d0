"""numlstm's CPU backend against torch.nn.LSTM, in one process, interleaved.

Usage::

    python bench/cpu.py                      # (T, B, I, H) = (100, 32, 64, 128), float32
    python bench/cpu.py --shape 50 16 32 64 --dtype float64 --repeats 21

Both run on the same number of threads (``--threads``, default 2). Compilation and
warm-up are excluded; each repeat times numlstm and torch back to back, and the table
reports medians, so load on a shared machine hits both alike. Forward is inference
(``numlstm.no_grad()`` / ``torch.no_grad()``); training is forward + backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _limit_threads(threads):
    # Before NumPy, Numba and torch start their pools.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run(shape, dtype_name, repeats, threads):
    """Time numlstm and torch on one configuration; return a dict of medians (seconds)."""
    import numpy as np
    import torch

    import numlstm

    torch.set_num_threads(threads)
    steps, batch, n_in, hidden = shape
    dtype = np.dtype(dtype_name)
    ours = numlstm.LSTM(n_in, hidden, dtype=dtype_name, seed=0)
    theirs = torch.nn.LSTM(n_in, hidden, dtype=getattr(torch, dtype_name))
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((steps, batch, n_in)).astype(dtype)
    x_torch = torch.from_numpy(x)
    d_output = np.ones((steps, batch, hidden), dtype)

    def ours_forward():
        with numlstm.no_grad():
            ours(x)

    def ours_train():
        ours(x)
        ours.backward(d_output)

    def theirs_forward():
        with torch.no_grad():
            theirs(x_torch)

    def theirs_train():
        x_grad = x_torch.clone().requires_grad_()
        output, _ = theirs(x_grad)
        output.backward(torch.ones_like(output))

    cases = {
        "numlstm forward": ours_forward,
        "torch forward": theirs_forward,
        "numlstm train": ours_train,
        "torch train": theirs_train,
    }
    for function in cases.values():  # compile and warm up
        function()
        function()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, function in cases.items():
            times[name].append(_timed(function))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None):
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs=4, default=[100, 32, 64, 128], metavar=("T", "B", "I", "H")
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    _limit_threads(args.threads)
    medians = run(tuple(args.shape), args.dtype, args.repeats, args.threads)
    steps, batch, n_in, hidden = args.shape
    flops = 2 * steps * batch * 4 * hidden * (n_in + hidden)
    print(
        f"(T, B, I, H) = {tuple(args.shape)}, {args.dtype}, {args.threads} threads, "
        f"median of {args.repeats}"
    )
    print(f"{'pass':<10}{'numlstm ms':>12}{'torch ms':>12}{'ratio':>8}{'numlstm GF/s':>14}")
    for kind, work in (("forward", flops), ("train", 3 * flops)):
        ours, theirs = medians[f"numlstm {kind}"], medians[f"torch {kind}"]
        print(
            f"{kind:<10}{ours * 1e3:>12.2f}{theirs * 1e3:>12.2f}{ours / theirs:>8.2f}"
            f"{work / ours / 1e9:>14.2f}"
        )


if __name__ == "__main__":
    main()
