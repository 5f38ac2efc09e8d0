"""The documentation's map of kernels to equations cannot drift from the code.

Every kernel declares the labels of the equations it computes with
:func:`numlstm.equations.implements`; the docs render each equation of
:data:`numlstm.equations.EQUATIONS` on ``docs/equations.rst`` and build the kernel map from
:data:`numlstm.equations.KERNELS` (``docs/_ext/kernel_map.py``). These tests need no
Sphinx: they read the registry and the page's source, as the docs extension does.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest

import numlstm
from numlstm.equations import EQUATIONS, GATES, Kernel, implements

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import kernel_registry  # noqa: E402

LOADED = kernel_registry.load_kernels()
RENDERED = kernel_registry.rendered_labels((DOCS / "equations.rst").read_text(encoding="utf-8"))


def kernel_id(kernel):
    return f"{kernel.backend}:{kernel_registry.qualified_name(kernel)}"


def test_the_shared_gates_and_the_cpu_backend_register_kernels():
    backends = {kernel.backend for kernel in LOADED.kernels}
    assert {kernel_registry.SHARED, "cpu"} <= backends
    assert "numlstm.gates" not in LOADED.skipped
    assert "numlstm.backends.cpu" not in LOADED.skipped


@pytest.mark.parametrize("kernel", LOADED.kernels, ids=kernel_id)
def test_every_kernel_declares_equations_the_docs_define(kernel):
    assert kernel.equations, f"{kernel_id(kernel)} declares no equation"
    unknown = [label for label in kernel.equations if label not in EQUATIONS]
    assert not unknown, f"{kernel_id(kernel)} names labels not in EQUATIONS: {unknown}"
    not_rendered = [label for label in kernel.equations if label not in RENDERED]
    assert not not_rendered, f"docs/equations.rst does not render {not_rendered}"


def test_the_equations_page_renders_every_equation_exactly_once():
    counts = Counter(RENDERED)
    assert set(counts) == set(EQUATIONS)
    assert [label for label, n in counts.items() if n > 1] == []


def test_the_equations_page_renders_them_in_the_order_of_the_table():
    assert RENDERED == list(EQUATIONS)


def test_every_equation_reference_in_the_docs_names_a_defined_label():
    reference = re.compile(r":eq:`([^`]+)`")
    pages = [*DOCS.glob("*.rst"), *DOCS.glob("examples/*.py")]
    referenced = {label for page in pages for label in reference.findall(page.read_text())}
    assert referenced, "the docs reference no equation"
    assert referenced <= set(EQUATIONS)


def test_a_skipped_kernel_module_is_one_that_cannot_be_imported_here():
    for module, reason in LOADED.skipped.items():
        assert module in kernel_registry.kernel_modules()
        assert reason.startswith(("ModuleNotFoundError", "ImportError")), reason


def test_a_missing_backend_module_is_skipped_and_reported(monkeypatch):
    missing = "numlstm.backends.no_such_backend"
    monkeypatch.setattr(kernel_registry, "kernel_modules", lambda: ["numlstm.gates", missing])
    loaded = kernel_registry.load_kernels()
    assert list(loaded.skipped) == [missing]
    assert missing in loaded.skipped[missing]


def test_an_import_error_inside_numlstm_is_not_hidden(monkeypatch):
    def broken(module):
        raise ImportError("cannot import name 'x'", name="numlstm.params")

    monkeypatch.setattr(kernel_registry.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="cannot import name"):
        kernel_registry.load_kernels()


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (("cell-update", "hidden-update"), "forward"),
        (("d-cell", "d-weights"), "backward"),
        (("input-projection", "d-input"), "forward and backward"),
    ],
)
def test_direction_follows_the_labels(labels, expected):
    kernel = Kernel("k", "cpu", object(), labels)
    assert kernel_registry.direction(kernel) == expected


@pytest.mark.parametrize("labels", [(), ("no-such-equation",), ("cell-update", "cell-updat")])
def test_implements_rejects_missing_or_unknown_labels(labels):
    with pytest.raises(ValueError, match="labels from EQUATIONS"):
        implements(*labels, backend="cpu")


def test_the_lstm_docstring_carries_the_equations_and_the_gate_layout():
    doc = numlstm.LSTM.__doc__
    cell = ["input-projection", "recurrent-projection", "input-gate", "forget-gate"]
    cell += ["cell-candidate", "output-gate", "cell-update", "hidden-update", "projection"]
    for label in cell:
        assert EQUATIONS[label].latex in doc, label
    for n, gate in enumerate(GATES):
        assert f"rows ``{n}H:{n + 1}H``: ``{gate.symbol}``, the {gate.name}" in doc
