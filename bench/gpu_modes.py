"""The CUDA backend's time-loop modes against each other, on a GPU.

For a few (B, H) pairs (T = 100, I = H, float32) it times numlstm's forward pass (under
``no_grad``) and forward + backward in the grouped mode (every batch, ``TILED_MIN_ITEMS``
set above ``B H``) and in the tiled mode (every batch, ``TILED_MIN_ITEMS = 1``), with
torch's forward (cuDNN) for scale, and prints one line per pair: medians in ms. This is
how :data:`numlstm.backends.cuda.TILED_MIN_ITEMS` was chosen.

Usage: ``python bench/gpu_modes.py [--out FILE]`` (needs a CUDA GPU and torch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

PAIRS = ((256, 1024), (64, 1024), (256, 512), (64, 512), (8, 512), (1, 128))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the lines to this file")
    args = parser.parse_args(argv)
    import torch
    from numba import cuda

    import numlstm
    from numlstm.backends import cuda as backend

    def synchronize():
        torch.cuda.synchronize()
        cuda.synchronize()

    def median_ms(function, repeats):
        function()
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    def measure(batch, hidden):
        model = torch.nn.LSTM(hidden, hidden).cuda()
        params = {k: v.detach() for k, v in model.state_dict().items()}
        x = torch.randn(100, batch, hidden, device="cuda")
        d_y = torch.randn(100, batch, hidden, device="cuda")

        def forward():
            with numlstm.no_grad():
                return numlstm.forward(x, params, backend="cuda")[0]

        def train():
            _, _, tape = numlstm.forward(x, params, backend="cuda")
            return numlstm.backward(tape, d_y)

        def torch_forward():
            with torch.no_grad():
                return model(x)[0]

        row = {"torch_forward": median_ms(torch_forward, 5)}
        default = backend.TILED_MIN_ITEMS
        try:
            for mode, threshold in {"grouped": 1 << 62, "tiled": 1}.items():
                backend.TILED_MIN_ITEMS = threshold
                row[f"forward_{mode}"] = median_ms(forward, 5)
                row[f"train_{mode}"] = median_ms(train, 3)
        finally:
            backend.TILED_MIN_ITEMS = default
        return f"B={batch} H={hidden} " + " ".join(f"{k}={v:.3f}" for k, v in row.items())

    lines = []
    for batch, hidden in PAIRS:
        lines.append(measure(batch, hidden))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as out:
            out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
