"""``.. public-api:: module``: an autodoc entry for every name in ``module.__all__``.

The reference then follows ``__all__``: a name added to the public API is documented by
itself, and a removed one disappears. Dunder names (``__version__``) are left out.
"""

from __future__ import annotations

import importlib
import inspect

from sphinx.util.docutils import SphinxDirective


def autodoc_lines(module_name):
    """The autodoc directives that document ``module_name.__all__``, in its order."""
    module = importlib.import_module(module_name)
    lines = []
    for name in module.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(module, name)
        if inspect.isclass(obj):
            directive = "autoexception" if issubclass(obj, BaseException) else "autoclass"
            lines += [f".. {directive}:: {module_name}.{name}", "   :members:", ""]
        elif callable(obj):
            lines += [f".. autofunction:: {module_name}.{name}", ""]
        else:
            lines += [f".. autodata:: {module_name}.{name}", ""]
    return lines


class PublicApi(SphinxDirective):
    required_arguments = 1

    def run(self):
        return self.parse_text_to_nodes("\n".join(autodoc_lines(self.arguments[0])))


def setup(app):
    app.add_directive("public-api", PublicApi)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
