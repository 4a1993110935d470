"""Sphinx configuration of tformer's documentation: guides taken from README.md, API from docstrings.

Build (strict: every warning is an error, every cross-reference must resolve)::

    python -m sphinx -W --keep-going -n -b html docs/site docs/site/_build/html

Nothing here reaches the network (no intersphinx): references to torch, numpy and the standard
library that Sphinx cannot resolve offline are listed in ``nitpick_ignore_regex`` below.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # the build writes nothing into the source tree, no __pycache__ either

import tformer  # noqa: E402  (the installed package, editable or not)

ROOT = Path(__file__).resolve().parents[2]

project = "tformer"
author = "tformer contributors"
copyright = "2026, tformer contributors"
version = release = tformer.__version__

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "alabaster"
html_title = f"tformer {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Normalization placement as a first-class, verified design axis",
    "fixed_sidebar": True,
    "page_width": "1200px",
    "sidebar_width": "260px",
}

# Docstrings are reStructuredText prose with ``literals``; a lone `x` is shown as code too.
default_role = "literal"
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autoclass_content = "both"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False  # nn.Module's own docstrings (forward, extra_repr, ...) are not ours
# Optional dependencies that are not installed are mocked, so the build never needs them.
autodoc_mock_imports = [m for m in ("xformers", "transformers") if importlib.util.find_spec(m) is None]

# Without intersphinx (no network), types of torch, numpy, the standard library and other
# dependencies cannot be linked; everything of tformer's must be.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|nn|safetensors|yaml|tokenizers|matplotlib|transformers|xformers)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Parameter|Optimizer|LRScheduler|Path|PathLike|ndarray|dtype|device)"),
    (r"py:.*", r"(collections|typing|pathlib|os|io|argparse|dataclasses|contextlib|enum|ctypes|types)\..*"),
    (r"py:.*", r"(.*\.)?(T|_T)"),  # type variables
    (r"py:class", r"tformer\..*\._\w+"),  # private base classes, shown by show-inheritance
]

# -- tformer's public names ----------------------------------------------------------------------
# Everything ``tformer/__init__.py`` exports is documented once, under its ``tformer.NAME`` (the page
# api/tformer.rst; classes carry their module path as their canonical name, so references to
# ``tformer.config.BlockConfig`` resolve there). The module pages leave those objects out.
_EXPORTED = {id(getattr(tformer, name)) for name in tformer.__all__}


def _skip_exported(app, what, name, obj, skip, options):
    if what == "module" and id(obj) in _EXPORTED and not isinstance(obj, (str, int, float, bool)):
        return True
    return None


def _plain_factory_defaults(app, what, name, obj, options, signature, return_annotation):
    # A dataclass field with a default_factory shows as ``=<factory>``, which is not Python and breaks
    # the signature's parsing (its annotations then become broken references): show ``=...`` instead.
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


# -- README.md as guide pages ---------------------------------------------------------------------
# Guide pages include README.md between section markers:
#
#     ```{include} ../../../README.md
#     :start-after: <!-- section: Norms -->
#     :end-before: <!-- section:
#     ```
#
# When README.md is read for an include, a marker is put before each level-2 heading (and at the end),
# headings move up one level (the section's ``##`` becomes the page title), and links to files of the
# repository become links to the pages that hold them, or the file's path where no page does.
_PAGES = {"REPRODUCTIONS.md": "results/reproductions", "BENCHMARKS.md": "results/benchmarks"}
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def _link(match: re.Match) -> str:
    text, target = match.group(1), match.group(2)
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
        return match.group(0)
    if target in _PAGES:
        return f"{{doc}}`{text} </{_PAGES[target]}>`"
    return f"`{target}`"


def readme_as_sections(text: str) -> str:
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            if level == 2:
                out += [f"<!-- section: {line[2:].strip()} -->", ""]
            if level >= 2:
                line = line[1:]
        if not fenced:
            line = _LINK.sub(_link, line)
        out.append(line)
    return "\n".join(out + ["", "<!-- section: end -->", ""])


def _include_read(app, relative_path, parent_docname, content):
    if (Path(app.srcdir) / relative_path).resolve() == ROOT / "README.md":
        content[0] = readme_as_sections(content[0])


def setup(app):
    app.connect("autodoc-skip-member", _skip_exported)
    app.connect("autodoc-process-signature", _plain_factory_defaults)
    app.connect("include-read", _include_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
