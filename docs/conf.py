"""Sphinx configuration of the numlstm documentation.

Build: ``pip install ".[docs]"`` then ``sphinx-build -W --keep-going -b html docs
docs/_build/html``. The build needs no network: MathJax comes from the pip package
``sphinx-mathjax-offline`` and is copied into the output.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# The extensions in docs/_ext, and the numlstm of this source tree (whose code the kernel
# map and the source links show) before any installed copy.
sys.path[:0] = [str(DOCS / "_ext"), str(DOCS.parent)]

# The gallery runs on the CPU, whatever the machine has, and its plots need no display.
os.environ.setdefault("NUMLSTM_BACKEND", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import numlstm  # noqa: E402

project = "numlstm"
author = "numlstm developers"
copyright = "numlstm developers"
release = numlstm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
    "sphinx-mathjax-offline",  # a bundled MathJax 3, copied into _static/mathjax
    "kernel_map",
    "optional_pages",
    "public_api",
]

exclude_patterns = ["_build", "examples/README.rst"]
templates_path = []
html_theme = "alabaster"
html_theme_options = {"page_width": "1100px", "sidebar_width": "230px"}
html_title = f"numlstm {release}"

# Autodoc: keep the order of the source, show signatures without type noise.
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}

# numpydoc: no autosummary tables of members (autodoc lists them).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# Equations are numbered per page: (1), (2), ...; :eq:`label` links to them.
math_eqref_format = "({number})"

# The cell figure of the tutorial is drawn by matplotlib at build time.
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
}
