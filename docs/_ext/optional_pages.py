"""Directives for pages and files that other parts of the project may not have written yet.

``.. optional-toctree::``
    A ``toctree`` that lists only the entries whose documents exist, so a page such as
    ``onnx.rst`` joins the table of contents as soon as it is added.

``.. optional-include:: path``
    The file at ``path`` (relative to the page) as a literal block where it exists, and
    the directive's content (a sentence) where it does not.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from sphinx.directives.other import TocTree
from sphinx.util.docutils import SphinxDirective


class OptionalTocTree(TocTree):
    def run(self):
        self.content = [entry for entry in self.content if self._exists(entry.strip())]
        return super().run()

    def _exists(self, docname):
        _, path = self.env.relfn2path(docname)
        return any(Path(path + suffix).is_file() for suffix in self.config.source_suffix)


class OptionalInclude(SphinxDirective):
    required_arguments = 1
    has_content = True

    def run(self):
        _, path = self.env.relfn2path(self.arguments[0])
        if Path(path).is_file():
            self.env.note_dependency(path)
            text = Path(path).read_text(encoding="utf-8")
            block = nodes.literal_block(text, text)
            block["language"] = "text"
            return [block]
        return self.parse_text_to_nodes("\n".join(self.content))


def setup(app):
    app.add_directive("optional-toctree", OptionalTocTree)
    app.add_directive("optional-include", OptionalInclude)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
