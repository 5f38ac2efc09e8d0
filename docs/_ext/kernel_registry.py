"""Which kernels compute which equations, collected from the code itself.

The kernels declare their equation labels with :func:`numlstm.equations.implements`, which
fills :data:`numlstm.equations.KERNELS` as their modules are imported. This module imports
them all and reads the registry, for the Sphinx extension :mod:`kernel_map` and for
``tests/test_docs.py``. It needs no Sphinx, so the tests run with the test extras only.
"""

from __future__ import annotations

import importlib
import re
from typing import NamedTuple

from numlstm import equations
from numlstm.backends import BACKENDS

#: The backend name of the scalar gate functions that every backend compiles.
SHARED = "shared"

#: Backward equations have labels that start with this prefix ("d-cell": δc_t).
BACKWARD_PREFIX = "d-"

#: A line of the equations page that renders one equation: ``.. lstm-equation:: label``.
EQUATION_DIRECTIVE = re.compile(r"^\s*\.\. lstm-equation::\s*(\S+)\s*$", re.MULTILINE)


def kernel_modules():
    """Modules whose import registers kernels: the shared gate functions, then each backend.

    Returns
    -------
    list of str
        ``numlstm.gates`` and ``numlstm.backends.<name>`` for every backend name that
        :data:`numlstm.backends.BACKENDS` lists (all but ``"auto"``).
    """
    backends = [name for name in BACKENDS if name != "auto"]
    return ["numlstm.gates", *(f"numlstm.backends.{name}" for name in backends)]


def _is_missing_optional(error, module):
    """Whether ``error`` says that ``module`` or a dependency outside numlstm is missing.

    An import error raised inside numlstm's own code is a bug, not a missing optional
    backend, and must not be hidden.
    """
    missing = error.name or ""
    return missing == module or not missing.startswith("numlstm")


class Loaded(NamedTuple):
    """The kernel registry after importing every kernel module that imports here."""

    kernels: tuple[equations.Kernel, ...]
    skipped: dict[str, str]


def load_kernels():
    """Import every kernel module and return the registry.

    A backend module that cannot be imported because it, or a package outside numlstm
    that it needs (numba-cuda for the CUDA backend), is missing is skipped and reported.

    Returns
    -------
    Loaded
        ``kernels``: every registered kernel, once each, in registration order;
        ``skipped``: module name to the reason it could not be imported.
    """
    skipped = {}
    for module in kernel_modules():
        try:
            importlib.import_module(module)
        except ImportError as error:
            if not _is_missing_optional(error, module):
                raise
            skipped[module] = f"{type(error).__name__}: {error}"
    unique = {(k.backend, qualified_name(k)): k for k in equations.KERNELS}
    return Loaded(tuple(unique.values()), skipped)


def qualified_name(kernel):
    """``module.function`` of a registered kernel, as autodoc and viewcode name it."""
    function = kernel.function
    module = getattr(function, "__module__", None) or function.py_func.__module__
    return f"{module}.{kernel.name}"


def direction(kernel):
    """``"forward"``, ``"backward"`` or ``"forward and backward"``, from its equations."""
    backward = [label.startswith(BACKWARD_PREFIX) for label in kernel.equations]
    if all(backward):
        return "backward"
    if not any(backward):
        return "forward"
    return "forward and backward"


def rendered_labels(text):
    """The equation labels an RST page renders with the ``lstm-equation`` directive.

    Parameters
    ----------
    text : str
        The page's source.

    Returns
    -------
    list of str
        The labels in page order, repeats included.
    """
    return EQUATION_DIRECTIVE.findall(text)
