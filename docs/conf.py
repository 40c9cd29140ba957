"""Sphinx configuration for the functorch_lite site: `bash scripts/docs.sh` builds it.

The markdown pages (docs/*.md) stay markdown (myst-parser); the API reference is generated from
the docstrings of the names in each public module's __all__ (docs/_ext/public_api.py); the
tutorials are the scripts in docs/tutorials/, executed by sphinx-gallery on every build, so a
broken example fails the build.
"""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))

import functorch_lite  # noqa: E402  (the one on PYTHONPATH: scripts/docs.sh sets it)

project = "functorch_lite"
author = "functorch_lite developers"
copyright = "functorch_lite developers"
release = version = functorch_lite.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "public_api",
]

root_doc = "index"

# A module that may not exist yet: its API section appears once it does (docs/api.rst). Only its
# absence is tolerated; if it exists and fails to import, the build fails.
if importlib.util.find_spec("functorch_lite.func") is not None:
    tags.add("functorch_lite_func")  # noqa: F821  (Sphinx gives conf.py `tags`)

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "tutorials/GALLERY_HEADER.rst"]

html_theme = "furo"
html_title = f"functorch_lite {release}"

# Docstrings: Google style (Args:/Returns:/Example:), read by napoleon.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures say it; our functions carry no annotations
autosummary_generate = False

# Markdown: GitHub-style heading anchors so that links like [x](design.md#dispatch-keys) resolve.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Tutorials: every docs/tutorials/*.py runs at build time, in file-name order.
sphinx_gallery_conf = {
    "examples_dirs": ["tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    "filename_pattern": r".*\.py$",
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "min_reported_time": 0,
    "write_computation_times": True,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "plot_gallery": "True",
    "run_stale_examples": True,  # run every tutorial on every build, not only changed ones
}
