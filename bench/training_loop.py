"""Time a plain training loop, with and without the CPU backend's buffer pool.

Usage::

    python bench/training_loop.py [--configs T,B,I,H ...] [--steps N] [--processes N]

Each configuration runs in new processes (the C library's heap is process-wide state),
alternately with the pool and without it (``numlstm.backends.cpu.buffer_pool.max_bytes =
0``), float32: a loop of ``model(x)`` then ``model.backward(d_output)``, as a user's
training loop calls them, with nothing else between the steps. It prints the median time
of a step and the minor page faults per step (``getrusage``), medians over the processes,
and (where PyTorch is installed) the same loop of ``torch.nn.LSTM`` training steps on as
many threads, in processes of its own.

Unlike ``python -m bench``, no other library runs between the steps: there, torch's
allocations between numlstm's calls kept the heap's free memory around, and numlstm did
not pay the faults that a loop of its own calls met before the pool.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys

CONFIGS = ("50,16,32,64", "100,32,64,128", "100,64,256,256", "200,8,128,512")
RESULTS = ("seconds", "faults")

# Each side defines step(), one training step; _TIMING times it the same way for both.
_NUMLSTM_STEP = """
import numpy as np
import numlstm
from numlstm.backends import cpu
T, B, I, H = {config}
if not {pool}:
    cpu.buffer_pool.max_bytes = 0
model = numlstm.LSTM(I, H, dtype="float32", seed=0)
rng = np.random.default_rng(0)
x = rng.standard_normal((T, B, I)).astype(np.float32)
d_output = rng.standard_normal((T, B, H)).astype(np.float32)
def step():
    model(x)
    model.backward(d_output)
"""

_TORCH_STEP = """
import numba
import torch
torch.set_num_threads(numba.get_num_threads())
T, B, I, H = {config}
model = torch.nn.LSTM(I, H)
x = torch.randn(T, B, I, requires_grad=True)
d_output = torch.randn(T, B, H)
def step():
    x.grad = None
    model.zero_grad()
    model(x)[0].backward(d_output)
"""

_TIMING = """
import json, resource, statistics, time
for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = []
for _ in range({steps}):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({{"seconds": statistics.median(times), "faults": faults / {steps}}}))
"""


def _run_child(config, pool, steps):
    setup = _NUMLSTM_STEP if pool is not None else _TORCH_STEP
    code = (setup + _TIMING).format(config=config, pool=pool, steps=steps)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    """Print, per configuration, the step time and page faults with and without the pool."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="T,B,I,H each")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process")
    parser.add_argument("--processes", type=int, default=3, help="processes per side")
    args = parser.parse_args(argv)
    sides = [True, False] + ([None] if importlib.util.find_spec("torch") else [])
    print(
        "| config (T,B,I,H) | pool ms | faults/step | no pool ms | faults/step | pool/no pool "
        "| torch ms | faults/step | pool/torch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        runs = {side: [] for side in sides}
        for _ in range(args.processes):
            for side in sides:
                runs[side].append(_run_child(config, side, args.steps))
        median = {
            side: {key: statistics.median(run[key] for run in runs[side]) for key in RESULTS}
            for side in sides
        }
        cells = [config]
        for side in sides:
            cells += [f"{median[side]['seconds'] * 1e3:.3f}", f"{median[side]['faults']:.0f}"]
            if side is False:
                cells.append(f"{median[True]['seconds'] / median[False]['seconds']:.2f}")
        if None in sides:
            cells.append(f"{median[True]['seconds'] / median[None]['seconds']:.2f}")
        else:
            cells += ["", "", ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
