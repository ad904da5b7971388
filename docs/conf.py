"""Sphinx configuration for the declarative user guide.

Build with warnings as errors, from the repository root::

    python -m sphinx -W -b html docs docs/_build/html
"""
import os
import sys

# The three top-level packages (declarative, compiler, solvers) import from the
# repository root, installed or not.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import declarative  # noqa: E402

project = "declarative"
author = "the declarative authors"
copyright = "the declarative authors; Apache-2.0"
release = declarative.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "requirements.txt"]
templates_path = []
html_static_path = []
html_theme = "alabaster"

# keep straight quotes: docstrings write transposes as q'x and x' P x
smartquotes = False

# autodoc: the source order of members; signatures keep their type hints
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"

# napoleon: the library's docstrings are numpy style
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
