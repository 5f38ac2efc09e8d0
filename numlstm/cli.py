"""The ``numlstm`` command line.

``numlstm demo`` trains an LSTM on the adding problem (see :mod:`numlstm.demo`);
``numlstm info`` tells which versions and backends this machine has. ``python -m numlstm``
is the same command.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from . import __version__, backends, demo
from .validation import CELLS

#: Exit status for a backend that cannot run here (as for a usage error).
EXIT_BACKEND_ERROR = 2


def _int_at_least(minimum, why=""):
    """An argparse ``type`` for integers ``>= minimum``; ``why`` explains the bound."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, got {value}")
        return value

    return parse


def _positive_float(text):
    """An argparse ``type`` for finite floats ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser():
    """The argument parser of ``numlstm`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="numlstm",
        description="numlstm: a Numba-accelerated LSTM with exact gradients.",
        epilog="Run 'numlstm COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    demo_parser = commands.add_parser(
        "demo",
        help="train an LSTM on the adding problem and test it",
        description=(
            "Train numlstm.LSTM(2, HIDDEN) with a linear readout and Adam on the adding "
            "problem (Hochreiter & Schmidhuber 1997): sequences of SEQ_LEN steps of a "
            "random value and a marker set at two steps; the target is the sum of the two "
            "marked values, which needs memory across the whole sequence. Then report the "
            f"test MSE beside the baseline of always answering {demo.BASELINE_ANSWER} "
            f"(about 0.167); below {demo.SOLVED_MSE} counts as solved."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo_parser.add_argument(
        "--backend",
        choices=backends.BACKENDS,
        default="auto",
        help="where the LSTM kernels run; auto follows NUMLSTM_BACKEND where set, else cpu "
        "for the demo's NumPy arrays",
    )
    demo_parser.add_argument(
        "--seq-len",
        type=_int_at_least(2, " (one marker in each half of the sequence)"),
        default=demo.SEQ_LEN,
        metavar="T",
        help="steps per sequence; longer sequences need more memory and more --steps",
    )
    demo_parser.add_argument(
        "--hidden",
        type=_int_at_least(1),
        default=demo.HIDDEN,
        metavar="H",
        help="hidden units of the LSTM",
    )
    demo_parser.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=demo.STEPS,
        metavar="N",
        help="training steps, each on a fresh batch",
    )
    demo_parser.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=demo.BATCH_SIZE,
        metavar="B",
        help="sequences per training step",
    )
    demo_parser.add_argument(
        "--lr",
        type=_positive_float,
        default=demo.LR,
        help="Adam's initial learning rate (it decays to 0 along a cosine)",
    )
    demo_parser.add_argument(
        "--cell",
        choices=CELLS,
        default="standard",
        help="the LSTM's cell: the standard one, with peephole connections, or the "
        "tutorial's LTM/STM cell whose use gate has a layer of its own",
    )
    demo_parser.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=0,
        help="seeds the data, the initial weights and the test set",
    )

    commands.add_parser(
        "info",
        help="show versions, backends and threading",
        description="Show the versions of numlstm and its dependencies, the backends this "
        "machine can run (and why not, for the others), Numba's threads and cache.",
    )
    return parser


def main(argv=None):
    """Run the ``numlstm`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments, without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a backend that cannot run here. Usage errors
        raise ``SystemExit(2)`` from argparse.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "info":
        return run_info()
    parser.print_help()
    return 0


def run_demo(args):
    """``numlstm demo``: train on the adding problem, print the test MSE and a verdict."""
    try:
        backend = backends.resolve(args.backend).name
    except (backends.BackendUnavailableError, ValueError) as error:
        print(f"numlstm demo: error: {error}", file=sys.stderr)
        return EXIT_BACKEND_ERROR
    print(
        f"numlstm {__version__} demo: the adding problem, {args.seq_len} steps per sequence\n"
        f"model: LSTM(2, {args.hidden}, cell='{args.cell}') + linear readout, float32, "
        f"{backend} backend\n"
        f"training: Adam, lr {args.lr:g} (cosine decay), batch {args.batch_size}, "
        f"{args.steps} steps, gradient norm clipped at {demo.CLIP_NORM:g}, seed {args.seed}",
        flush=True,
    )
    result = demo.train(
        seq_len=args.seq_len,
        hidden=args.hidden,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        backend=args.backend,
        progress=demo.Progress(args.steps),
        cell=args.cell,
    )
    print(
        f"trained in {result.seconds:.1f} s\n"
        f"test MSE on {demo.TEST_SIZE} new sequences: {result.test_mse:.4g}\n"
        f"baseline MSE (always answering {demo.BASELINE_ANSWER}): {result.baseline_mse:.4g}"
    )
    if result.solved:
        print(f"solved: test MSE {result.test_mse:.2g} < {demo.SOLVED_MSE:g}")
    else:
        print(
            f"not solved yet: test MSE {result.test_mse:.2g} >= {demo.SOLVED_MSE:g}; "
            "try more --steps"
        )
    return 0


def _distribution_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _default_backend():
    try:
        default = backends.get_backend()
    except ValueError as error:
        return f"invalid: {error}"
    if default == "auto":
        default = "auto (cpu for NumPy arrays, cuda for CUDA arrays)"
    from_env = os.environ.get(backends.ENV_VAR)
    return f"{default}, from {backends.ENV_VAR}={from_env}" if from_env else default


def _numba_cache_dir():
    """Where Numba keeps numlstm's compiled kernels (``cache=True``)."""
    from .backends import cpu

    cache = getattr(cpu.forward_kernel, "_cache", None)
    return getattr(cache, "cache_path", None) or "unknown"


def _blas_lines():
    """One line per BLAS library loaded, if threadpoolctl is installed."""
    try:
        import scipy.linalg  # noqa: F401 - loads the BLAS that Numba's np.dot calls
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        f"BLAS: {pool['internal_api']} {pool['version']}, {pool['num_threads']} threads "
        f"({os.path.basename(pool['filepath'])})"
        for pool in threadpool_info()
        if pool["user_api"] == "blas"
    ]


def run_info():
    """``numlstm info``: versions, backends, threads and the kernel cache."""
    import numba
    import numpy
    import scipy

    lines = [
        f"numlstm {__version__}",
        f"Python {platform.python_version()} ({sys.executable})",
        f"NumPy {numpy.__version__}",
        f"Numba {numba.__version__} (llvmlite {_distribution_version('llvmlite')})",
        f"SciPy {scipy.__version__}",
        f"numba-cuda {_distribution_version('numba-cuda')}",
        f"torch {_distribution_version('torch')}",
        "",
        f"default backend: {_default_backend()}",
        "backends:",
    ]
    for name, status in backends.available_backends().items():
        state = "available" if status.available else "unavailable"
        lines.append(f"  {name:<5} {state:<11}  {status.reason}")
    lines += [
        "",
        f"Numba threads: {numba.get_num_threads()} "
        f"(threading layer: {numba.config.THREADING_LAYER})",
        f"Numba cache: {_numba_cache_dir()}",
        *_blas_lines(),
    ]
    print("\n".join(lines))
    return 0
