"""How much a call slows down right after the other library's call, in one process.

Usage (from the repository root; it needs PyTorch)::

    python bench/order.py                 # every grid configuration
    python bench/order.py --configs 0 2

Each repeat runs numlstm, torch, torch, numlstm (inference forward, float32, 2 threads each),
so that each library is timed once right after itself and once right after the other. The
medians show what :func:`bench.cpu.compare` leaves out by not timing the first call of a
run: the other library's OpenMP threads go on spinning on the cores for a while after its
call returns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cpu import GRID, limit_threads, pinned_threads

THREADS = 2


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(config, seconds=3.0):
    """Median times of each library right after itself and right after the other.

    Parameters
    ----------
    config : bench.cpu.Config
        One grid configuration, run in float32 inference.
    seconds : float
        Rough length of the measurement.

    Returns
    -------
    dict of str to float
        Milliseconds: ``numlstm_after_numlstm``, ``numlstm_after_torch``,
        ``torch_after_torch``, ``torch_after_numlstm``.
    """
    import numpy as np
    import torch

    import numlstm

    x = np.random.default_rng(0).standard_normal((config.T, config.B, config.I))
    x = x.astype(np.float32)
    x_torch = torch.from_numpy(x)
    ours = numlstm.LSTM(config.I, config.H, num_layers=config.layers, dtype="float32", seed=0)
    theirs = torch.nn.LSTM(config.I, config.H, num_layers=config.layers)

    def run_ours():
        with numlstm.no_grad():
            ours(x)

    def run_theirs():
        with torch.no_grad():
            theirs(x_torch)

    for function in (run_ours, run_theirs, run_ours, run_theirs):
        function()
    sequence = (run_ours, run_theirs, run_theirs, run_ours)
    times = [[] for _ in sequence]
    for _ in range(max(7, int(seconds / (4 * _timed(run_theirs))))):
        for k, function in enumerate(sequence):
            times[k].append(_timed(function))
    ms = [1e3 * statistics.median(t) for t in times]
    return {
        "numlstm_after_numlstm": ms[0],
        "torch_after_numlstm": ms[1],
        "torch_after_torch": ms[2],
        "numlstm_after_torch": ms[3],
    }


def main(argv=None):
    """Print each library's time right after itself and right after the other."""
    parser = argparse.ArgumentParser(
        prog="python bench/order.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--configs", nargs="+", type=int, help="grid indices (default: all)")
    args = parser.parse_args(argv)
    limit_threads(THREADS)
    indices = args.configs if args.configs is not None else range(len(GRID))
    print("config: numlstm ms after numlstm / after torch; torch ms after torch / after numlstm")
    with pinned_threads(THREADS):
        for index in indices:
            config = GRID[index]
            r = measure(config)
            ours = r["numlstm_after_torch"] / r["numlstm_after_numlstm"]
            theirs = r["torch_after_numlstm"] / r["torch_after_torch"]
            print(
                f"{config.label}: numlstm {r['numlstm_after_numlstm']:.3f} / "
                f"{r['numlstm_after_torch']:.3f} (x{ours:.3f}); torch "
                f"{r['torch_after_torch']:.3f} / {r['torch_after_numlstm']:.3f} (x{theirs:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
