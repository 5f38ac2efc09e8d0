"""Sphinx directives that render the equations and the kernel map from the code.

``.. lstm-equation:: label``
    One equation of :data:`numlstm.equations.EQUATIONS`: its description and its LaTeX,
    numbered, with ``label`` as the target of ``:eq:`label```. The build warns (an error
    under ``-W``) when an equation is rendered nowhere or twice.

``.. kernel-map:: kernels`` / ``.. kernel-map:: gates``
    A table of the compiled kernels of every backend (kernel, backend, direction,
    equations, source), or of the shared gate functions with their equations; built from
    :data:`numlstm.equations.KERNELS`, which the kernels fill with
    :func:`numlstm.equations.implements`.

``.. kernel-autodoc:: kernels`` / ``.. kernel-autodoc:: gates``
    An autodoc entry (docstring and ``[source]`` link) for each of them.
"""

from __future__ import annotations

import kernel_registry
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from numlstm.equations import EQUATIONS

logger = logging.getLogger(__name__)

GROUPS = ("kernels", "gates")


def _in_group(kernel, group):
    return (kernel.backend == kernel_registry.SHARED) == (group == "gates")


def _indent(lines, spaces):
    return [" " * spaces + line if line else "" for line in lines]


class _RstDirective(SphinxDirective):
    """A directive that writes reStructuredText and parses it in place."""

    def parse_rst(self, lines):
        return self.parse_text_to_nodes("\n".join(lines))


class LstmEquation(_RstDirective):
    required_arguments = 1

    def run(self):
        label = self.arguments[0]
        if label not in EQUATIONS:
            raise self.error(f"unknown equation label {label!r}; known: {sorted(EQUATIONS)}")
        rendered = self.env.numlstm_equations.setdefault(label, [])
        rendered.append(self.env.docname)
        equation = EQUATIONS[label]
        description = equation.description[0].upper() + equation.description[1:]
        lines = [
            f"``{label}``: {description}.",
            "",
            ".. math::",
            f"   :label: {label}",
            "",
            f"   {equation.latex}",
        ]
        return self.parse_rst(lines)


class _KernelDirective(_RstDirective):
    required_arguments = 1

    def kernels(self):
        group = directives.choice(self.arguments[0], GROUPS)
        loaded = self.env.app.numlstm_kernels
        return [k for k in loaded.kernels if _in_group(k, group)], group


class KernelMap(_KernelDirective):
    def source_link(self, kernel):
        module, _, _ = kernel_registry.qualified_name(kernel).rpartition(".")
        page = "_modules/" + module.replace(".", "/")
        uri = self.env.app.builder.get_relative_uri(self.env.docname, page)
        return f"`source <{uri}#{kernel_registry.qualified_name(kernel)}>`__"

    def equations_cell(self, kernel, with_latex):
        items = []
        for label in sorted(kernel.equations, key=list(EQUATIONS).index):
            item = f":eq:`{label}` ``{label}``"
            if with_latex:
                item += f" :math:`{EQUATIONS[label].latex}`"
            items.append(f"- {item}")
        return items

    def run(self):
        kernels, group = self.kernels()
        if not kernels:
            raise self.error(f"no kernel of the group {group!r} is registered")
        if group == "kernels":
            header = ["Kernel", "Backend", "Direction", "Equations", "Source"]
            widths = "25 8 12 45 10"
        else:
            header = ["Gate function", "Equations"]
            widths = "25 75"
        lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
        lines += [f"   {'*' if n == 0 else ' '} - {title}" for n, title in enumerate(header)]
        for kernel in kernels:
            name = f":func:`~{kernel_registry.qualified_name(kernel)}`"
            cells = [[name]]
            if group == "kernels":
                cells += [
                    [f"``{kernel.backend}``"],
                    [kernel_registry.direction(kernel)],
                    self.equations_cell(kernel, with_latex=False),
                    [self.source_link(kernel)],
                ]
            else:
                cells.append(self.equations_cell(kernel, with_latex=True))
            for n, cell in enumerate(cells):
                lines.append(f"   {'*' if n == 0 else ' '} - {cell[0]}")
                lines += _indent(cell[1:], 7)
        return self.parse_rst(lines)


class KernelAutodoc(_KernelDirective):
    def run(self):
        kernels, _ = self.kernels()
        lines = []
        for kernel in kernels:
            lines += [f".. autofunction:: {kernel_registry.qualified_name(kernel)}", ""]
        return self.parse_rst(lines)


class SkippedBackends(SphinxDirective):
    """A note naming each backend module that could not be imported in this build."""

    def run(self):
        skipped = self.env.app.numlstm_kernels.skipped
        if not skipped:
            return []
        text = "; ".join(f"``{module}`` ({reason})" for module, reason in skipped.items())
        note = nodes.note()
        note += self.parse_text_to_nodes(
            "This build could not import these kernel modules, so their kernels are not "
            f"listed: {text}."
        )
        return [note]


def _init_env(app, env, docnames):
    if not hasattr(env, "numlstm_equations"):
        env.numlstm_equations = {}


def _purge(app, env, docname):
    for docs in getattr(env, "numlstm_equations", {}).values():
        while docname in docs:
            docs.remove(docname)


def _merge(app, env, docnames, other):
    for label, docs in other.numlstm_equations.items():
        env.numlstm_equations.setdefault(label, []).extend(docs)


def _check_equations(app, env):
    for label in EQUATIONS:
        docs = env.numlstm_equations.get(label, [])
        if len(docs) != 1:
            logger.warning(
                "equation %r is rendered %d times (pages: %s); render each equation of "
                "numlstm.equations.EQUATIONS exactly once with '.. lstm-equation::'",
                label,
                len(docs),
                ", ".join(docs) or "none",
            )


def _load_kernels(app):
    app.numlstm_kernels = kernel_registry.load_kernels()
    for module, reason in app.numlstm_kernels.skipped.items():
        logger.info("kernel map: skipped %s (%s)", module, reason)


def setup(app):
    app.connect("builder-inited", _load_kernels)
    app.connect("env-before-read-docs", _init_env)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check_equations)
    app.add_directive("lstm-equation", LstmEquation)
    app.add_directive("kernel-map", KernelMap)
    app.add_directive("kernel-autodoc", KernelAutodoc)
    app.add_directive("skipped-backends", SkippedBackends)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
