"""Time from a new Python process to its first forward and backward results.

Usage::

    python bench/startup.py

The first process starts with an empty Numba cache (a fresh ``NUMBA_CACHE_DIR``), so it
pays the cold compile; the next ones reuse that cache, as a user's second run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json
import time
start = time.perf_counter()
import numpy as np
import numlstm
imported = time.perf_counter()
lstm = numlstm.LSTM(8, 32, dtype="{dtype}", seed=0)
x = np.ones((20, 4, 8), "{dtype}")
output, _ = lstm(x)
forward = time.perf_counter()
lstm.backward(np.ones_like(output))
backward = time.perf_counter()
print(json.dumps({{"import": imported - start, "forward": forward - start,
                  "backward": backward - start}}))
"""


def _run_child(cache_dir, dtype):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _CHILD.format(dtype=dtype)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    inner = json.loads(result.stdout.strip().splitlines()[-1])
    return {"process": wall, **inner}


def main():
    """Print cold and warm start-up times, in seconds."""
    rows = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for dtype in ("float32", "float64"):
            rows[f"{dtype} cold"] = _run_child(cache_dir, dtype)
            for run in range(2):
                rows[f"{dtype} warm {run + 1}"] = _run_child(cache_dir, dtype)
    print(f"{'run':<16}{'import':>9}{'1st forward':>13}{'1st backward':>14}{'process':>9}")
    for name, row in rows.items():
        print(
            f"{name:<16}{row['import']:>9.2f}{row['forward']:>13.2f}{row['backward']:>14.2f}"
            f"{row['process']:>9.2f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
