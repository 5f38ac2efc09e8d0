"""numlstm's CPU backend against torch.nn.LSTM, in one process, interleaved.

Usage (from the repository root; it needs PyTorch)::

    python -m bench                          # the whole grid; results in bench/results/
    python -m bench --quick                  # a smoke run of the first configuration
    python -m bench --configs 0 2 100,8,16,32,1 --dtype float64 --threads 4
    python -m bench --dtype float32 --runs 5    # medians over 5 runs, and their spread

``python bench/cpu.py`` takes the same flags where numlstm is installed. Both libraries run
on the same number of threads (``--threads``, default 2): the thread variables of OpenMP,
OpenBLAS, MKL and Numba are set before NumPy, Numba and torch are imported, and
torch.set_num_threads, Numba's set_num_threads and threadpoolctl (when installed) hold them
there during the run.
torch.nn.LSTM runs its default CPU path: oneDNN for float32, ATen's own loop over steps for
float64 (the harness checks which with torch's profiler and records it).

Each configuration is measured in two modes: inference forward (``numlstm.no_grad()`` /
``torch.no_grad()``) and training forward + backward (the parameter gradients and the input
gradient on both sides). Compilation and warm-up are excluded. Each round runs numlstm
and torch in short runs of three calls back to back, alternating which goes first, so load
on a shared machine hits both alike; the first call of a run is not timed, because the other
library's OpenMP threads still spin on the cores for a while (:func:`compare`). Rounds go
on until each side has run for ``--min-time`` seconds and at least ``--repeats`` times, and
the table reports medians.

Work is counted as forward FLOPs = D·2·T·B·4H·(I_l + H) summed over layers (I_l = I for the
first layer, D·H above it; D = 2 for a bidirectional configuration, ``T,B,I,H,layers,bi``);
training counts 3x forward. The BLAS GEMM peak is a square
``np.dot`` of size ``--gemm-size`` timed in the same run on the same threads, before and
after the configurations (the higher median counts); the table gives each side's GF/s as a
percentage of it, and the ratio numlstm would have if it ran at that peak: the lowest
ratio this machine allows, whatever the code. The results go to cpu.json (every median,
versions, threads, CPU, date), cpu.md (the table) and, with matplotlib, cpu.png (the
ratios) in ``--out``.

This shared machine's speed drifts from one minute to the next, so a ratio near a target
can fall on either side of it from run to run. ``--runs N`` repeats the whole plan N
times in the same process: the table then gives, for each row, the median over the runs
of each number, followed by the lowest and highest run's ratio and % of peak (error bars
in the plot), and cpu.json keeps every run (:func:`across_runs`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: Environment variables that size the thread pools of OpenMP (torch, oneDNN), OpenBLAS
#: (NumPy, SciPy, so Numba's np.dot), MKL and Numba's own pool.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)

MODES = ("forward", "train")
DTYPES = ("float32", "float64")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: Above these relative differences between numlstm's and torch's results (forward output,
#: input gradient) the harness warns that the two may not be doing the same work.
PARITY_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}
#: The run is flagged as disturbed when the load average exceeds the spare CPUs by this
#: much, or when the GEMM peak changed by more than this fraction between start and end.
BUSY_LOAD_MARGIN = 0.5
BUSY_PEAK_CHANGE = 0.15


@dataclass(frozen=True)
class Config:
    """One benchmark shape: sequence length, batch, input size, hidden size, layers, and
    whether the layers are bidirectional."""

    T: int
    B: int
    I: int  # noqa: E741 (the equations' name for the input size)
    H: int
    layers: int
    bidirectional: bool = False

    @property
    def label(self):
        return f"{self.T},{self.B},{self.I},{self.H},{self.layers}" + (
            ",bi" if self.bidirectional else ""
        )

    @property
    def directions(self):
        """``D``: 2 for bidirectional layers, else 1."""
        return 2 if self.bidirectional else 1

    def forward_flops(self):
        """FLOPs of one forward pass: D·2·T·B·4H·(I_l + H) summed over the layers."""
        inputs = [self.I] + [self.directions * self.H] * (self.layers - 1)
        return sum(
            self.directions * 2 * self.T * self.B * 4 * self.H * (n_in + self.H) for n_in in inputs
        )

    def flops(self, mode):
        """FLOPs counted for ``mode``: forward, or 3x forward for training."""
        return self.forward_flops() * (3 if mode == "train" else 1)


#: The grid of issue #4, as (T, B, I, H, layers).
GRID = (
    Config(50, 16, 32, 64, 1),
    Config(100, 32, 64, 128, 1),
    Config(100, 64, 256, 256, 1),
    Config(200, 8, 128, 512, 1),
    Config(100, 32, 128, 256, 2),
    Config(1000, 1, 32, 64, 1),
)
#: The configurations also run in float64 when --dtype is not given.
FLOAT64_DEFAULT = (GRID[0], GRID[1], GRID[2])


def parse_config(text):
    """Read one ``--configs`` entry.

    Parameters
    ----------
    text : str
        A grid index (``"2"``), or five positive integers ``"T,B,I,H,layers"``, followed by
        ``",bi"`` for bidirectional layers.

    Returns
    -------
    Config

    Raises
    ------
    ValueError
        For an index outside the grid or a string of another form.
    """
    if text.isdigit():
        index = int(text)
        if index >= len(GRID):
            raise ValueError(
                f"--configs: index {index} is out of range; expected 0 to {len(GRID) - 1}"
            )
        return GRID[index]
    fields = text.split(",")
    bidirectional = len(fields) == 6 and fields[5].strip() == "bi"
    numbers = fields[:5] if bidirectional else fields
    if len(numbers) != 5 or not all(
        field.strip().isdigit() and int(field) > 0 for field in numbers
    ):
        raise ValueError(
            "--configs: expected a grid index or five positive integers 'T,B,I,H,layers' "
            f"(then ',bi' for bidirectional layers), got {text!r}"
        )
    return Config(*(int(field) for field in numbers), bidirectional=bidirectional)


def plan(configs, dtype):
    """The (config, dtype) pairs to run.

    Parameters
    ----------
    configs : list of Config
    dtype : {"float32", "float64"} or None
        Run every config in this dtype; None runs all in float32, then those of
        ``FLOAT64_DEFAULT`` in float64.

    Returns
    -------
    list of (Config, str)
    """
    if dtype is not None:
        return [(config, dtype) for config in configs]
    float64 = [config for config in configs if config in FLOAT64_DEFAULT]
    return [(config, "float32") for config in configs] + [(config, "float64") for config in float64]


def limit_threads(threads):
    """Set the thread variables; effective for the libraries not yet imported.

    ``NUMBA_NUM_THREADS`` is left alone once Numba is imported: Numba rereads it at every
    compilation and refuses a value that differs from its running pool
    (:func:`pinned_threads` sets Numba's threads instead).
    """
    for var in THREAD_ENV_VARS:
        if var == "NUMBA_NUM_THREADS" and "numba" in sys.modules:
            continue
        os.environ[var] = str(threads)


@contextlib.contextmanager
def pinned_threads(threads):
    """Hold torch, Numba and the BLAS pools at ``threads``; yield what each reports.

    On exit the previous thread counts come back, so the harness can run inside another
    process (the tests) without leaving it changed.
    """
    import numba
    import scipy.linalg.cython_blas  # noqa: F401 (loads the BLAS that Numba's np.dot calls)
    import torch

    saved = torch.get_num_threads(), numba.get_num_threads()
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        threadpool_info, limits = None, contextlib.nullcontext()
    else:
        limits = threadpool_limits(threads)
    try:
        with limits:
            # Numba first: starting its OpenMP threading layer resets torch's thread count.
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            torch.set_num_threads(threads)
            yield {
                "requested": threads,
                "torch": torch.get_num_threads(),
                "numba": numba.get_num_threads(),
                "env": {var: os.environ.get(var) for var in THREAD_ENV_VARS},
                "threadpools": "threadpoolctl is not installed"
                if threadpool_info is None
                else [
                    {key: pool.get(key) for key in ("internal_api", "num_threads", "version")}
                    for pool in threadpool_info()
                ],
            }
    finally:
        # After threadpoolctl has put back the pools it knew, for the same reason.
        numba.set_num_threads(saved[1])
        torch.set_num_threads(saved[0])


#: Calls per side in a row within a round of :func:`compare`; the first of each run is not
#: timed (see there).
BLOCK = 3


def compare(first, second, min_time, min_repeats, block=BLOCK):
    """Time two functions interleaved, in short runs of each.

    Each round calls one function ``block`` times in a row, then the other, alternating
    which goes first, until each has ``min_repeats`` timed calls and ``min_time`` seconds
    of them. The first call of every run is not timed: right after the other library, its
    OpenMP threads still spin on the two cores for a while, and the first call pays for
    it. Measured by ``bench/order.py`` (float32 forward): numlstm right after
    torch 3-5 % slower than right after itself at the large configurations and 17 % at
    (50,16,32,64,1); torch right after numlstm 1-2 % and 16 %. Neither library's user
    pays that cost, and timing it would only blur the comparison.

    Parameters
    ----------
    first, second : callable
        Functions of no arguments, already warmed up.
    min_time : float
        Seconds each side runs in total (timed calls), at least.
    min_repeats : int
        Timed calls per side, at least.
    block : int
        Calls per side in a row, the first one untimed (at least 2).

    Returns
    -------
    tuple of two lists of float
        The seconds of each timed call of ``first`` and of ``second``.
    """
    if block < 2:
        raise ValueError(
            f"block must be at least 2 (one untimed call, then timed ones), got {block}"
        )
    times = ([], [])
    functions = (first, second)
    gc.collect()
    rounds = 0
    while len(times[0]) < min_repeats or min(sum(times[0]), sum(times[1])) < min_time:
        order = (0, 1) if rounds % 2 == 0 else (1, 0)
        rounds += 1
        for side in order:
            functions[side]()
            for _ in range(block - 1):
                start = time.perf_counter()
                functions[side]()
                times[side].append(time.perf_counter() - start)
    return times


def gemm_peak(dtype, size, repeats):
    """Time a square ``np.dot`` on the current threads, after one warm-up.

    Parameters
    ----------
    dtype : {"float32", "float64"}
    size : int
        n of the n x n x n product (2 n^3 FLOPs).
    repeats : int

    Returns
    -------
    dict
        ``size``, ``repeats``, ``median_s`` and ``gflops`` (from the median).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(dtype) for _ in range(2))
    out = np.empty((size, size), dtype)
    np.dot(a, b, out=out)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.dot(a, b, out=out)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "size": size,
        "repeats": repeats,
        "median_s": median,
        "gflops": 2 * size**3 / median / 1e9,
    }


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (torch's profiler logs to it from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def torch_path(dtype):
    """Which implementation torch.nn.LSTM runs on the CPU in ``dtype``, from its operators.

    Returns
    -------
    str
        oneDNN when both the inference forward and a training forward + backward run
        oneDNN's operators (``aten::mkldnn_rnn_layer``, ``..._backward``); otherwise ATen's
        loop over steps, or a note of which mode does what.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    dtype = getattr(torch, dtype)
    module, x = torch.nn.LSTM(4, 8, dtype=dtype), torch.zeros((3, 2, 4), dtype=dtype)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as forward:
        with torch.no_grad():
            module(x)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as train:
        module(x.clone().requires_grad_())[0].sum().backward()
    forward_onednn = "aten::mkldnn_rnn_layer" in {event.key for event in forward.key_averages()}
    train_onednn = "aten::mkldnn_rnn_layer_backward" in {
        event.key for event in train.key_averages()
    }
    if forward_onednn and train_onednn:
        return "oneDNN (aten::mkldnn_rnn_layer and its backward)"
    if not forward_onednn and not train_onednn:
        return "ATen, a loop over steps (aten::lstm)"
    return f"oneDNN in {'forward' if forward_onednn else 'train'} only"


def _relative_difference(actual, expected):
    import numpy as np

    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


#: The cells ``--cell`` takes; a variant is timed against numlstm's standard cell.
CELLS = ("standard", "peephole", "ltm_stm")


def baseline(cell):
    """What the second side of the comparison runs: torch, or numlstm's standard cell."""
    return "torch" if cell == "standard" else "standard cell"


def _models(config, dtype, cell="standard"):
    """numlstm's LSTM of ``cell`` and its baseline, an input and an output gradient.

    The baseline is ``torch.nn.LSTM`` for the standard cell, and numlstm's standard cell
    for a variant (which torch does not have); both sides share the standard weights.
    """
    import numpy as np
    import torch

    import numlstm

    def numlstm_model(cell):
        return numlstm.LSTM(
            config.I,
            config.H,
            num_layers=config.layers,
            bidirectional=config.bidirectional,
            dtype=dtype,
            backend="cpu",
            seed=0,
            cell=cell,
        )

    ours = numlstm_model(cell)
    if cell == "standard":
        theirs = torch.nn.LSTM(
            config.I,
            config.H,
            num_layers=config.layers,
            bidirectional=config.bidirectional,
            dtype=getattr(torch, dtype),
        )
        theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    else:
        theirs = numlstm_model("standard")
        shared = ours.state_dict()
        theirs.load_state_dict({name: shared[name] for name in theirs.state_dict()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((config.T, config.B, config.I)).astype(dtype)
    d_output = rng.standard_normal((config.T, config.B, config.directions * config.H))
    d_output = d_output.astype(dtype)
    return ours, theirs, x, d_output


def bench_config(config, dtype, min_time, min_repeats, cell="standard"):
    """Measure one configuration in both modes, after a warm-up that also compiles.

    Parameters
    ----------
    config : Config
    dtype : {"float32", "float64"}
    min_time, min_repeats
        As for :func:`compare`.
    cell : str
        numlstm's cell; a variant is compared with numlstm's standard cell (its time is in
        the rows' ``torch_s``: the baseline side), and has no parity check.

    Returns
    -------
    rows : list of dict
        One per mode: the config, dtype, mode, FLOPs, repeats, and each side's median and
        fastest time in seconds.
    record : dict
        The largest relative difference between the two sides' results per mode (forward
        output, input gradient), which shows that both did the same work.
    """
    import torch

    import numlstm

    ours, theirs, x, d_output = _models(config, dtype, cell)
    x_torch = torch.from_numpy(x)
    x_train = x_torch.clone().requires_grad_()
    d_output_torch = torch.from_numpy(d_output)

    def numlstm_sides(model):
        def forward():
            with numlstm.no_grad():
                return model(x)[0]

        def train():
            model(x)
            return model.backward(d_output)[0]

        return forward, train

    ours_forward, ours_train = numlstm_sides(ours)

    def theirs_forward():
        with torch.no_grad():
            return theirs(x_torch)[0]

    def theirs_train():
        x_train.grad = None
        theirs(x_train)[0].backward(d_output_torch)
        return x_train.grad

    if cell != "standard":
        theirs_forward, theirs_train = numlstm_sides(theirs)
    sides = {"forward": (ours_forward, theirs_forward), "train": (ours_train, theirs_train)}
    # Warm-up (and Numba's compilation), and a check that both sides compute the same thing:
    # the output in forward, d_x in training.
    parity = {}
    for mode, (ours_fn, theirs_fn) in sides.items():
        for _ in range(2):
            ours_result, theirs_result = ours_fn(), theirs_fn()
        if cell == "standard":  # a variant computes something else than its baseline
            parity[mode] = _relative_difference(ours_result, theirs_result.detach().numpy())
    record = {
        "config": config.label,
        "dtype": dtype,
        "max_relative_difference": parity,
    }
    rows = []
    for mode, (ours_fn, theirs_fn) in sides.items():
        ours_times, theirs_times = compare(ours_fn, theirs_fn, min_time, min_repeats)
        rows.append(
            {
                "config": asdict(config),
                "label": config.label,
                "dtype": dtype,
                "cell": cell,
                "baseline": baseline(cell),
                "mode": mode,
                "flops": config.flops(mode),
                "repeats": len(ours_times),
                "numlstm_s": statistics.median(ours_times),
                "torch_s": statistics.median(theirs_times),
                **_spread("numlstm", ours_times),
                **_spread("torch", theirs_times),
            }
        )
    return rows, record


def _spread(side, seconds):
    """The fastest time and the interquartile range, to judge a median by."""
    quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return {f"{side}_min_s": min(seconds), f"{side}_iqr_s": quartiles[2] - quartiles[0]}


def _busy_warnings(report):
    """Signs that other processes took CPU time during the run, which makes ratios unreliable.

    Interleaving exposes both sides to the same load, but not equally: torch's OpenMP
    barrier at every time step loses most when the cores are oversubscribed.
    """
    warnings = []
    spare = report["logical_cpus"] - report["threads"]["requested"]
    # At the end the run's own threads still count in the 1-minute average, and at the
    # start those of the run before it in this process, if any.
    threads = report["threads"]["requested"]
    own_at_start = threads if report.get("follows_a_run") else 0
    for when, key, own in (
        ("start", "load_average", own_at_start),
        ("end", "load_average_end", threads),
    ):
        load = report[key]
        if load is not None and load[0] > spare + own + BUSY_LOAD_MARGIN:
            warnings.append(
                f"1-minute load average {load[0]:.2f} at the {when} on "
                f"{report['logical_cpus']} logical CPUs: other processes were running"
            )
    for dtype, peak in report["gemm_peak"].items():
        low, high = sorted((peak["start"]["gflops"], peak["end"]["gflops"]))
        if low < (1 - BUSY_PEAK_CHANGE) * high:
            warnings.append(
                f"the {dtype} GEMM peak changed from {peak['start']['gflops']:.1f} to "
                f"{peak['end']['gflops']:.1f} GF/s during the run"
            )
    return warnings


def _add_derived(row, peaks):
    """Ratio, GF/s and % of the dtype's GEMM peak, from a row's medians; and the ratio
    numlstm would have if it ran at that peak (``ratio_at_peak``), the lowest that this
    machine allows: a target below it cannot be met here."""
    peak = peaks[row["dtype"]]["gflops"]
    row["ratio"] = row["numlstm_s"] / row["torch_s"]
    for side in ("numlstm", "torch"):
        gflops = row["flops"] / row[f"{side}_s"] / 1e9
        row[f"{side}_gflops"] = gflops
        row[f"{side}_peak_pct"] = 100 * gflops / peak
    row["ratio_at_peak"] = row["flops"] / (peak * 1e9) / row["torch_s"]
    return row


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment():
    import llvmlite
    import numba
    import numpy
    import torch

    import numlstm

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(),
            "numlstm": numlstm.__version__,
            "numpy": numpy.__version__,
            "numba": numba.__version__,
            "llvmlite": llvmlite.__version__,
            "torch": torch.__version__,
        },
        "torch_mkldnn_enabled": torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled,
    }


def _peaks(dtypes, size, repeats):
    return {dtype: gemm_peak(dtype, size, repeats) for dtype in dtypes}


def run(
    pairs,
    threads,
    min_time,
    min_repeats,
    gemm_size,
    gemm_repeats,
    log=print,
    cell="standard",
    follows_a_run=False,
):
    """Run the benchmark with the threads pinned, in this process.

    The GEMM peak is measured before and after the configurations; the % of peak uses the
    higher of the two, so that load during one of them does not flatter the percentages.

    Parameters
    ----------
    pairs : list of (Config, str)
        What to run, as :func:`plan` gives it.
    threads : int
    min_time, min_repeats
        As for :func:`compare`.
    gemm_size, gemm_repeats
        As ``size`` and ``repeats`` of :func:`gemm_peak`.
    log : callable
        Called with a line of text as each result comes in.
    cell : str
        numlstm's cell (see :func:`bench_config`).
    follows_a_run : bool
        Another run of this process has just ended (``--runs``): its own threads still
        count in the load average at the start, which :func:`_busy_warnings` then allows.

    Returns
    -------
    dict
        The environment (date, CPU, versions, load), ``threads``, ``settings``,
        ``gemm_peak``, ``torch_path``, ``parity``, ``results`` (one row per config, dtype
        and mode, with medians, ratio, GF/s and % of peak), ``follows_a_run`` and
        ``busy_warnings``: what cpu.json holds.
    """
    with pinned_threads(threads) as threads_report:
        report = _run(
            pairs, threads_report, min_time, min_repeats, gemm_size, gemm_repeats, log, cell
        )
    report["follows_a_run"] = follows_a_run
    report["busy_warnings"] = _busy_warnings(report)
    return report


def _run(pairs, threads_report, min_time, min_repeats, gemm_size, gemm_repeats, log, cell):
    environment = _environment()
    dtypes = sorted({dtype for _, dtype in pairs})
    peaks_start = _peaks(dtypes, gemm_size, gemm_repeats)
    paths = {dtype: torch_path(dtype) for dtype in dtypes}
    for dtype, peak in peaks_start.items():
        log(
            f"{dtype}: BLAS GEMM peak {peak['gflops']:.1f} GF/s (n = {gemm_size}); torch runs "
            f"{paths[dtype]}"
        )
    log("  ".join(_columns(cell)))
    rows, parity = [], []
    for config, dtype in pairs:
        config_rows, record = bench_config(config, dtype, min_time, min_repeats, cell)
        parity.append(record)
        for row in config_rows:
            rows.append(_add_derived(row, peaks_start))
            log(_format_row(row, sep="  "))
    peaks_end = _peaks(dtypes, gemm_size, gemm_repeats)
    peaks = {
        dtype: {
            "size": gemm_size,
            "gflops": max(peaks_start[dtype]["gflops"], peaks_end[dtype]["gflops"]),
            "start": peaks_start[dtype],
            "end": peaks_end[dtype],
        }
        for dtype in dtypes
    }
    environment["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {
        **environment,
        "threads": threads_report,
        "cell": cell,
        "baseline": baseline(cell),
        "settings": {"min_time_s": min_time, "min_repeats": min_repeats},
        "gemm_peak": peaks,
        "torch_path": paths,
        "parity": parity,
        "results": [_add_derived(row, peaks) for row in rows],
    }
    return report


def across_runs(reports):
    """One report for several runs of the same plan, in this process.

    Each number of a row (times, ratio, GF/s, % of peak) is the median of that number over
    the runs, each run's own; ``ratio_min``, ``ratio_max``, ``numlstm_peak_pct_min`` and
    ``numlstm_peak_pct_max`` give the spread of the two that the targets are stated in.
    The environment is the first run's and ``load_average_end`` the last one's;
    ``gemm_peak`` holds the median of the runs' peaks, with each run's in ``runs``;
    ``busy_warnings`` holds every run's, prefixed with its number; ``runs`` keeps each
    run's date, GEMM peaks, warnings and rows.

    Parameters
    ----------
    reports : list of dict
        What :func:`run` returned for each run, all of the same plan.

    Returns
    -------
    dict
        A report in the layout of :func:`run`'s, with ``runs`` added.
    """
    first = reports[0]
    results = []
    for index, row in enumerate(first["results"]):
        samples = [report["results"][index] for report in reports]
        merged = dict(row)
        for key, value in row.items():
            if isinstance(value, float):
                merged[key] = statistics.median(sample[key] for sample in samples)
        for key in ("ratio", "numlstm_peak_pct"):
            merged[f"{key}_min"] = min(sample[key] for sample in samples)
            merged[f"{key}_max"] = max(sample[key] for sample in samples)
        results.append(merged)
    gemm_peak = {
        dtype: {
            **peak,
            "gflops": statistics.median(report["gemm_peak"][dtype]["gflops"] for report in reports),
            "end": reports[-1]["gemm_peak"][dtype]["end"],
            "runs": [report["gemm_peak"][dtype]["gflops"] for report in reports],
        }
        for dtype, peak in first["gemm_peak"].items()
    }
    return {
        **first,
        "load_average_end": reports[-1]["load_average_end"],
        "gemm_peak": gemm_peak,
        "parity": [record for report in reports for record in report["parity"]],
        "results": results,
        "busy_warnings": [
            f"run {number}: {warning}"
            for number, report in enumerate(reports, 1)
            for warning in report["busy_warnings"]
        ],
        "runs": [
            {
                "date": report["date"],
                "gemm_peak": report["gemm_peak"],
                "busy_warnings": report["busy_warnings"],
                "results": report["results"],
            }
            for report in reports
        ],
    }


COLUMNS = (
    "config (T,B,I,H,L)",
    "dtype",
    "mode",
    "numlstm ms",
    "torch ms",
    "numlstm/torch",
    "numlstm GF/s",
    "torch GF/s",
    "numlstm % peak",
    "torch % peak",
    "numlstm/torch at peak",
)


def _columns(cell):
    """The table's columns, the baseline named as :func:`baseline` names it."""
    return tuple(column.replace("torch", baseline(cell)) for column in COLUMNS)


def _format_row(row, sep=" | "):
    cells = (
        row["label"],
        row["dtype"],
        row["mode"],
        f"{row['numlstm_s'] * 1e3:.3f}",
        f"{row['torch_s'] * 1e3:.3f}",
        f"{row['ratio']:.2f}",
        f"{row['numlstm_gflops']:.1f}",
        f"{row['torch_gflops']:.1f}",
        f"{row['numlstm_peak_pct']:.0f}",
        f"{row['torch_peak_pct']:.0f}",
        f"{row['ratio_at_peak']:.2f}",
    )
    return sep.join(cells)


def _load(load_average):
    return "unknown" if load_average is None else f"{load_average[0]:.2f}"


def markdown(report, command):
    """The results as a Markdown header and table."""
    runs = report.get("runs", [])
    if runs:
        peaks = ", ".join(
            f"{dtype} {peak['gflops']:.1f} GF/s (n = {peak['size']}; the median of the runs' "
            + ", ".join(f"{gflops:.1f}" for gflops in peak["runs"])
            + ")"
            for dtype, peak in report["gemm_peak"].items()
        )
    else:
        peaks = ", ".join(
            f"{dtype} {peak['gflops']:.1f} GF/s (n = {peak['size']}; "
            f"{peak['start']['gflops']:.1f} before the configurations, "
            f"{peak['end']['gflops']:.1f} after)"
            for dtype, peak in report["gemm_peak"].items()
        )
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    paths = ", ".join(f"{dtype} {path}" for dtype, path in report["torch_path"].items())
    lines = [
        f"`{command}`, {report['date']}, {report['cpu']}, "
        f"{report['threads']['requested']} threads, 1-minute load average "
        f"{_load(report['load_average'])} at the start, {_load(report['load_average_end'])} "
        "at the end.",
        "",
        f"BLAS GEMM peak (np.dot, same threads): {peaks}. torch.nn.LSTM runs: {paths}. {versions}.",
        "",
        *(
            f"**Warning: {warning}; the ratios are unreliable.**"
            for warning in report["busy_warnings"]
        ),
        *([""] if report["busy_warnings"] else []),
        "Medians of interleaved repeats"
        + (f", then medians over {len(runs)} runs of the whole plan" if runs else "")
        + "; forward is inference, train is forward + backward (parameter and input "
        "gradients); GF/s count 2·T·B·4H·(I+H) per layer and direction, 3x for train. "
        "numlstm/torch at peak: the ratio numlstm would have at the BLAS GEMM peak, the "
        "lowest this machine allows.",
        "",
        *(
            [
                f"numlstm runs cell='{report['cell']}'; the baseline is numlstm's standard "
                "cell on the same weights.",
                "",
            ]
            if report.get("cell", "standard") != "standard"
            else []
        ),
        "| " + " | ".join(_columns(report.get("cell", "standard"))) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += [f"| {_format_row(row)} |" for row in report["results"]]
    if runs:
        lines += [
            "",
            f"Spread over the {len(runs)} runs (each run's own median ratio and % of its own "
            "peak):",
            "",
            "| config (T,B,I,H,L) | dtype | mode | numlstm/torch min | median | max "
            "| numlstm % peak min | max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['label']} | {row['dtype']} | {row['mode']} | {row['ratio_min']:.2f} "
            f"| {row['ratio']:.2f} | {row['ratio_max']:.2f} | {row['numlstm_peak_pct_min']:.0f} "
            f"| {row['numlstm_peak_pct_max']:.0f} |"
            for row in report["results"]
        ]
    return "\n".join(lines) + "\n"


def plot(report, path):
    """Bar chart of the numlstm/torch ratios; return False (and draw nothing) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = list(dict.fromkeys((row["label"], row["dtype"]) for row in report["results"]))
    rows = {(row["label"], row["dtype"], row["mode"]): row for row in report["results"]}
    width = 0.38
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(groups)), 4.5))
    for offset, mode in zip((-width / 2, width / 2), MODES, strict=True):
        mode_rows = [rows.get((*group, mode)) for group in groups]
        ratios = [math.nan if row is None else row["ratio"] for row in mode_rows]
        spread = None
        if "runs" in report:  # bars from the lowest to the highest run's ratio
            spread = [
                [0.0 if row is None else row["ratio"] - row["ratio_min"] for row in mode_rows],
                [0.0 if row is None else row["ratio_max"] - row["ratio"] for row in mode_rows],
            ]
        bars = axes.bar(
            [index + offset for index in range(len(groups))],
            ratios,
            width,
            yerr=spread,
            capsize=2,
            label=mode,
        )
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.axhline(1.0, color="black", linewidth=1)
    axes.axhline(0.5, color="black", linewidth=1, linestyle="--")
    # Ratios span orders of magnitude; a log axis shows 2x slower and 2x faster alike.
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels([f"{label}\n{dtype}" for label, dtype in groups], fontsize=8)
    axes.set_xlabel("config (T,B,I,H,layers[,bi]), dtype")
    cell = report.get("cell", "standard")
    axes.set_ylabel(
        "time numlstm / torch.nn.LSTM"
        if cell == "standard"
        else f"time cell='{cell}' / standard cell"
    )
    busy = "\nwarning: the machine was busy, the ratios are unreliable"
    axes.set_title(
        f"{report['cpu']}, {report['threads']['requested']} threads, {report['date'][:10]}"
        + (busy if report["busy_warnings"] else ""),
        fontsize=10,
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write(report, out, command):
    """Write cpu.json, cpu.md and (with matplotlib) cpu.png into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "cpu.json", out / "cpu.md"]
    paths[0].write_text(json.dumps({**report, "command": command}, indent=1) + "\n")
    paths[1].write_text(markdown(report, command))
    if plot(report, out / "cpu.png"):
        paths.append(out / "cpu.png")
    return paths


def _positive(kind):
    """An argparse type: ``kind`` (int or float) of the text, which must be > 0."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return convert


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n")[0],
        epilog="Grid: "
        + "; ".join(f"{index}: {config.label}" for index, config in enumerate(GRID)),
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        metavar="CONFIG",
        help="grid indices or 'T,B,I,H,layers' strings, with ',bi' appended for bidirectional "
        "layers (default: the whole grid; --quick: 0)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="run every config in this dtype (default: float32 for all, float64 for "
        + ", ".join(config.label for config in FLOAT64_DEFAULT)
        + ")",
    )
    parser.add_argument(
        "--threads", type=_positive(int), default=2, help="threads for both (default 2)"
    )
    parser.add_argument(
        "--min-time",
        type=_positive(float),
        help="seconds of timed runs per config, mode and side (default 0.3; --quick: 0.05)",
    )
    parser.add_argument(
        "--repeats", type=_positive(int), help="at least this many repeats (default 5; --quick: 3)"
    )
    parser.add_argument(
        "--gemm-size",
        type=_positive(int),
        help="size of the GEMM peak test (default 2048; --quick: 1024)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for cpu.json, cpu.md, cpu.png (default bench/results; --quick: a temporary "
        "folder)",
    )
    parser.add_argument(
        "--cell",
        choices=CELLS,
        default="standard",
        help="numlstm's cell; a variant is timed against numlstm's standard cell (default "
        "standard, against torch)",
    )
    parser.add_argument(
        "--runs",
        type=_positive(int),
        default=1,
        help="run the whole plan this many times in this process; the table gives medians "
        "over the runs and their spread (default 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: grid config 0, short timings, a small GEMM",
    )
    return parser


def main(argv=None):
    """Run the benchmark, print the table and write cpu.json, cpu.md and cpu.png.

    Parameters
    ----------
    argv : list of str, optional
        The command-line flags (``python -m bench --help``); default ``sys.argv[1:]``.

    Returns
    -------
    dict
        The report, as :func:`run` returns it.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        configs = [parse_config(text) for text in (args.configs or (["0"] if args.quick else []))]
    except ValueError as error:
        parser.error(str(error))
    limit_threads(args.threads)
    quick = args.quick
    reports = []
    for number in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"run {number} of {args.runs}")
        reports.append(
            run(
                plan(configs or list(GRID), args.dtype),
                threads=args.threads,
                min_time=args.min_time or (0.05 if quick else 0.3),
                min_repeats=args.repeats or (3 if quick else 5),
                gemm_size=args.gemm_size or (1024 if quick else 2048),
                gemm_repeats=5 if quick else 7,
                cell=args.cell,
                follows_a_run=number > 1,
            )
        )
    report = reports[0] if args.runs == 1 else across_runs(reports)
    out = args.out or (Path(tempfile.mkdtemp(prefix="numlstm-bench-")) if quick else DEFAULT_OUT)
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(markdown(report, command))
    for record in report["parity"]:
        tolerance = PARITY_TOLERANCE[record["dtype"]]
        for mode, difference in record["max_relative_difference"].items():
            if difference > tolerance:
                print(
                    f"warning: {record['config']} {record['dtype']} {mode}: numlstm and torch "
                    f"differ by {difference:.2e} (relative), more than {tolerance:.0e}"
                )
    for path in write(report, out, command):
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
