"""numlstm's CUDA backend against torch.nn.LSTM (cuDNN): forward, and forward + backward.

For each batch size B and hidden size H (input size I = H, T steps, float32), both models
hold the same weights (numlstm reads torch's parameter tensors in place, as CUDA arrays)
and get the same input, a CUDA tensor. Each repeat times one call of each, interleaved,
with the device synchronised around every timed call; the medians are compared. The
forward pass runs without saving anything for backward on either side (``no_grad``).

Writes ``results.json`` and ``results.md`` to ``--out`` and prints the table. ``--smoke``
runs a tiny grid (it also runs in the CUDA simulator, with torch on the CPU), to test this
script without a GPU.

Usage: ``python bench/gpu_bench.py --out DIR [--budget SECONDS] [--smoke]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 8, 64, 256)
HIDDENS = (128, 512, 1024)
STEPS = 100
SMOKE = {"batches": (1, 2), "hiddens": (3,), "steps": 3, "min_repeats": 2, "max_repeats": 2}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the results")
    parser.add_argument(
        "--budget", type=float, default=300.0, help="seconds for the whole benchmark"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny grid, to test the script")
    return parser.parse_args(argv)


class Setup:
    """One configuration: a torch.nn.LSTM and numlstm's view of the same weights."""

    def __init__(self, torch, batch, hidden, steps, device):
        from numba import cuda

        self.torch, self.device = torch, device
        generator = torch.Generator().manual_seed(0)
        self.model = torch.nn.LSTM(hidden, hidden).to(device)
        x = torch.randn(steps, batch, hidden, generator=generator)
        self.x = x.to(device)
        self.d_output = torch.randn(steps, batch, hidden, generator=generator).to(device)
        if device == "cuda":
            # The same memory, seen by numlstm through __cuda_array_interface__.
            self.params = {k: v.detach() for k, v in self.model.state_dict().items()}
            self.nx, self.nd_output = self.x, self.d_output
        else:  # smoke test in the simulator: host parameters, simulated device arrays
            self.params = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
            self.nx = cuda.to_device(x.numpy())
            self.nd_output = cuda.to_device(self.d_output.numpy())

    def synchronize(self):
        from numba import cuda

        if self.device == "cuda":
            self.torch.cuda.synchronize()
        cuda.synchronize()

    def torch_forward(self):
        with self.torch.no_grad():
            return self.model(self.x)[0]

    def torch_train(self):
        x = self.x.detach().requires_grad_(True)
        output, _ = self.model(x)
        output.backward(self.d_output)
        return output

    def numlstm_forward(self):
        import numlstm

        with numlstm.no_grad():
            return numlstm.forward(self.nx, self.params, backend="cuda")[0]

    def numlstm_train(self):
        import numlstm

        output, _, tape = numlstm.forward(self.nx, self.params, backend="cuda")
        numlstm.backward(tape, self.nd_output)
        return output


def _time(function, synchronize):
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    return time.perf_counter() - start


def _to_numpy(array):
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    return array.copy_to_host() if hasattr(array, "copy_to_host") else np.asarray(array)


def measure(setup, deadline, min_repeats, max_repeats):
    """Interleaved medians of both passes; repeats stop at ``deadline`` (after the minimum)."""
    passes = {
        "forward": (setup.numlstm_forward, setup.torch_forward),
        "forward+backward": (setup.numlstm_train, setup.torch_train),
    }
    result = {}
    for name, (ours, theirs) in passes.items():
        difference = float(np.max(np.abs(_to_numpy(ours()) - _to_numpy(theirs()))))  # warm-up
        times = {"numlstm": [], "torch": []}
        for repeat in range(max_repeats):
            if repeat >= min_repeats and time.perf_counter() > deadline:
                break
            times["numlstm"].append(_time(ours, setup.synchronize))
            times["torch"].append(_time(theirs, setup.synchronize))
        medians = {k: statistics.median(v) for k, v in times.items()}
        result[name] = {
            "numlstm_ms": 1e3 * medians["numlstm"],
            "torch_ms": 1e3 * medians["torch"],
            "speed_ratio": medians["torch"] / medians["numlstm"],
            "repeats": len(times["numlstm"]),
            "max_abs_output_difference": difference,
        }
    return result


def markdown(rows, meta):
    lines = [
        "# numlstm cuda vs torch.nn.LSTM (cuDNN)",
        "",
        f"{meta['device']}; T = {meta['steps']}, I = H, float32; medians of interleaved "
        "runs. Ratio = torch time / numlstm time (above 1: numlstm is faster).",
        f"torch {meta['torch']}, cuDNN TF32 allowed: {meta['cudnn_allow_tf32']}.",
        "",
        "| B | H | forward numlstm (ms) | forward torch (ms) | ratio "
        "| fwd+bwd numlstm (ms) | fwd+bwd torch (ms) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        f, t = row["forward"], row["forward+backward"]
        lines.append(
            f"| {row['batch']} | {row['hidden']} | {f['numlstm_ms']:.3f} | {f['torch_ms']:.3f} "
            f"| {f['speed_ratio']:.2f} | {t['numlstm_ms']:.3f} | {t['torch_ms']:.3f} "
            f"| {t['speed_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse(argv)
    import torch
    from numba import config, cuda

    import numlstm

    started = time.perf_counter()
    if args.smoke:
        grid = SMOKE
    else:
        grid = {"batches": BATCHES, "hiddens": HIDDENS, "steps": STEPS}
        grid |= {"min_repeats": 3, "max_repeats": 25}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.smoke and config.ENABLE_CUDASIM):
        print("gpu_bench: torch sees no CUDA GPU (use --smoke in the simulator)", file=sys.stderr)
        return 2
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "CUDA simulator",
        "torch": torch.__version__,
        "numlstm": numlstm.__version__,
        "python": platform.python_version(),
        "cuda_backend": numlstm.available_backends()["cuda"].reason,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "steps": grid["steps"],
        "smoke": args.smoke,
    }
    configs = [(b, h) for h in grid["hiddens"] for b in grid["batches"]]
    rows = []
    for index, (batch, hidden) in enumerate(configs):
        # Share what is left of the budget among the configurations still to run.
        left = args.budget - (time.perf_counter() - started)
        deadline = time.perf_counter() + max(left, 0.0) / (len(configs) - index)
        setup = Setup(torch, batch, hidden, grid["steps"], device)
        row = {"batch": batch, "hidden": hidden}
        row |= measure(setup, deadline, grid["min_repeats"], grid["max_repeats"])
        rows.append(row)
        f, t = row["forward"], row["forward+backward"]
        print(
            f"B={batch:4d} H={hidden:5d}  forward {f['numlstm_ms']:8.3f} ms vs "
            f"{f['torch_ms']:8.3f} ms (ratio {f['speed_ratio']:5.2f})  fwd+bwd "
            f"{t['numlstm_ms']:8.3f} ms vs {t['torch_ms']:8.3f} ms (ratio {t['speed_ratio']:5.2f})",
            flush=True,
        )
        del setup
    cuda.synchronize()
    meta["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "results.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
